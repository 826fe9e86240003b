//! Request fingerprints: the same key must always name the same request.

use std::convert::Infallible;
use std::fmt;

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// A SHA-256 digest of what makes a request that request: method, path, query (without the
/// `__idempotent_key` parameter), content type and body. A `multipart/form-data` body counts by
/// its fields, not its raw bytes, so the boundary a client draws does not matter.
///
/// Each part is length-prefixed, and the digest starts with a version tag, so no two different
/// requests share a fingerprint by shifting bytes between parts, and a future change of the
/// recipe cannot collide with today's.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

const VERSION: &[u8] = b"tower-idempotency fingerprint v1";

impl Fingerprint {
    /// Computes the fingerprint of a request from its parts.
    pub fn compute(
        method: &[u8],
        path: &[u8],
        query: &[u8],
        content_type: &[u8],
        body: &[u8],
    ) -> Self {
        let mut h = Sha256::new();
        for part in [VERSION, method, path, query, content_type, body] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        Self(h.finalize().into())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// The content type a canonical multipart body is fingerprinted under.
pub(crate) const MULTIPART_FORM_DATA: &[u8] = b"multipart/form-data";

/// Whether a `Content-Type` value names `multipart/form-data`.
pub(crate) fn is_multipart(content_type: &[u8]) -> bool {
    let essence = content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default();
    essence
        .trim_ascii()
        .eq_ignore_ascii_case(MULTIPART_FORM_DATA)
}

/// A `multipart/form-data` body taken field by field (name, file name, content type, bytes),
/// length-prefixed and versioned, or `None` when the body is not multipart or does not parse.
///
/// Clients draw a fresh boundary for every submission (a browser does for each click of a
/// submit button), so the raw bytes of two identical multipart requests differ. Fingerprinting
/// the fields instead makes a double-submitted upload form a duplicate, not a reused key.
pub(crate) async fn canonical_multipart(content_type: &[u8], body: &Bytes) -> Option<Vec<u8>> {
    if !is_multipart(content_type) {
        return None;
    }
    let ct = std::str::from_utf8(content_type).ok()?;
    let boundary = multer::parse_boundary(ct).ok()?;
    let body = body.clone();
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut out = Vec::with_capacity(64);
    let mut put = |part: &[u8]| {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    };
    put(b"multipart fields v1");
    loop {
        let field = multipart.next_field().await.ok()?;
        let Some(field) = field else { break };
        let name = field.name().map(|n| n.as_bytes().to_vec());
        let file_name = field.file_name().map(|n| n.as_bytes().to_vec());
        let content_type = field.content_type().map(|m| m.as_ref().as_bytes().to_vec());
        for meta in [name, file_name, content_type] {
            match meta {
                Some(m) => {
                    put(b"1");
                    put(&m);
                }
                None => put(b"0"),
            }
        }
        let data = field.bytes().await.ok()?;
        put(&data);
    }
    Some(out)
}

/// Removes every `__idempotent_key` parameter from a raw query string, keeping the rest byte for
/// byte and in order.
pub(crate) fn query_without_key(query: &str, param: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            !pair.is_empty()
                && form_urlencoded::parse(pair.as_bytes())
                    .next()
                    .is_none_or(|(name, _)| name != param)
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cannot_shift() {
        let a = Fingerprint::compute(b"POST", b"/ab", b"", b"", b"c");
        let b = Fingerprint::compute(b"POST", b"/a", b"", b"", b"bc");
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn multipart_counts_fields_not_boundaries() {
        fn form(boundary: &str, item: &str) -> (String, Bytes) {
            let body = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"item\"\r\n\r\n{item}\r\n--{boundary}--\r\n"
            );
            (
                format!("multipart/form-data; boundary={boundary}"),
                Bytes::from(body),
            )
        }
        let canon = |(ct, body): (String, Bytes)| async move {
            canonical_multipart(ct.as_bytes(), &body)
                .await
                .expect("a well-formed multipart body")
        };
        let a = canon(form("AAAA", "book")).await;
        assert_eq!(a, canon(form("BBBBBB", "book")).await);
        assert_ne!(a, canon(form("AAAA", "lamp")).await);
        assert!(
            canonical_multipart(b"text/plain", &Bytes::from_static(b"x"))
                .await
                .is_none()
        );
        assert!(
            canonical_multipart(
                b"multipart/form-data; boundary=Z",
                &Bytes::from_static(b"junk")
            )
            .await
            .is_none()
        );
    }

    #[test]
    fn key_parameter_is_dropped_from_query() {
        assert_eq!(
            query_without_key("a=1&__idempotent_key=x&b=2", "__idempotent_key"),
            "a=1&b=2"
        );
        assert_eq!(
            query_without_key("__idempotent_key=x", "__idempotent_key"),
            ""
        );
        assert_eq!(query_without_key("a=%20&b", "__idempotent_key"), "a=%20&b");
        assert_eq!(
            query_without_key("%5F_idempotent_key=x&c=3", "__idempotent_key"),
            "c=3"
        );
    }
}
