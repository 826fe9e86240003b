//! Request fingerprints: the same key must always name the same request.

use std::convert::Infallible;
use std::fmt;

use bytes::Bytes;
use http::header::CONTENT_ENCODING;
use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

/// A SHA-256 digest of what makes a request that request: method, path, query (without the
/// `__idempotent_key` parameter), content type, body, and the values of `Content-Encoding` and
/// of any [fingerprint headers] configured. A `multipart/form-data` body counts by its fields,
/// not its raw bytes, so the boundary a client draws does not matter.
///
/// Each part is length-prefixed, and the digest starts with a version tag, so no two different
/// requests share a fingerprint by shifting bytes between parts, and a future change of the
/// recipe cannot collide with today's.
///
/// Headers come after the body, each one only when the request carries it: its name, the
/// number of its values, then each value, all length-prefixed. A request without
/// `Content-Encoding` and without any fingerprint header therefore has the fingerprint it had
/// before headers counted, and records stored by earlier versions still match it. A request
/// that carries one does not match a record stored before it counted: within the record's TTL,
/// such a duplicate gets 422 and does not run (see the crate docs).
///
/// [fingerprint headers]: crate::IdempotencyLayer::with_fingerprint_headers
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

const VERSION: &[u8] = b"tower-idempotency fingerprint v1";

impl Fingerprint {
    /// The fingerprint as 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        crate::storage_key::push_hex(&self.0, &mut s);
        s
    }

    /// Computes the fingerprint of a request without `Content-Encoding` and without fingerprint
    /// headers, from its parts.
    pub fn compute(
        method: &[u8],
        path: &[u8],
        query: &[u8],
        content_type: &[u8],
        body: &[u8],
    ) -> Self {
        Self::compute_with_headers(
            method,
            path,
            query,
            content_type,
            &HeaderMap::new(),
            &[],
            body,
        )
    }

    /// Computes the fingerprint of a request from its parts, its `Content-Encoding` and the
    /// headers named in `extra`, read from `headers` (every value, in order). `extra` is taken as
    /// it is: `Content-Encoding` counts once whether or not it is named there.
    pub fn compute_with_headers(
        method: &[u8],
        path: &[u8],
        query: &[u8],
        content_type: &[u8],
        headers: &HeaderMap,
        extra: &[HeaderName],
        body: &[u8],
    ) -> Self {
        fn put(h: &mut Sha256, part: &[u8]) {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let mut h = Sha256::new();
        for part in [VERSION, method, path, query, content_type, body] {
            put(&mut h, part);
        }
        let names = std::iter::once(&CONTENT_ENCODING)
            .chain(extra.iter().filter(|n| **n != CONTENT_ENCODING));
        for name in names {
            let values = headers.get_all(name);
            let count = values.iter().count();
            if count == 0 {
                continue;
            }
            put(&mut h, name.as_str().as_bytes());
            put(&mut h, &(count as u64).to_be_bytes());
            for value in values {
                put(&mut h, value.as_bytes());
            }
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

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, http::HeaderValue::from_static(v));
        }
        h
    }

    fn with(h: &HeaderMap, extra: &[HeaderName], body: &[u8]) -> Fingerprint {
        Fingerprint::compute_with_headers(b"POST", b"/o", b"", b"text/plain", h, extra, body)
    }

    /// The digest of a request without `Content-Encoding` or fingerprint headers is pinned: a
    /// record stored by an earlier version still matches its duplicate.
    #[test]
    fn a_request_without_headers_keeps_its_fingerprint() {
        let mut h = Sha256::new();
        for part in [VERSION, b"POST", b"/o", b"a=1", b"text/plain", b"body"] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let expected = Fingerprint(h.finalize().into());
        assert_eq!(
            Fingerprint::compute(b"POST", b"/o", b"a=1", b"text/plain", b"body"),
            expected
        );
        let unrelated = headers(&[("x-other", "1"), ("accept-encoding", "gzip")]);
        let extra = [HeaderName::from_static("x-http-method-override")];
        assert_eq!(
            Fingerprint::compute_with_headers(
                b"POST",
                b"/o",
                b"a=1",
                b"text/plain",
                &unrelated,
                &extra,
                b"body"
            ),
            expected
        );
    }

    #[test]
    fn content_encoding_and_named_headers_count() {
        let none = HeaderMap::new();
        let plain = with(&none, &[], b"x");
        let gzip = with(&headers(&[("content-encoding", "gzip")]), &[], b"x");
        assert_ne!(plain, gzip);
        assert_ne!(
            gzip,
            with(&headers(&[("content-encoding", "br")]), &[], b"x")
        );
        // Repeated values count one by one, in order.
        let two = headers(&[("content-encoding", "gzip"), ("content-encoding", "br")]);
        let swapped = headers(&[("content-encoding", "br"), ("content-encoding", "gzip")]);
        let joined = headers(&[("content-encoding", "gzip, br")]);
        assert_ne!(with(&two, &[], b"x"), with(&swapped, &[], b"x"));
        assert_ne!(with(&two, &[], b"x"), with(&joined, &[], b"x"));
        // Naming Content-Encoding again changes nothing.
        assert_eq!(
            gzip,
            with(
                &headers(&[("content-encoding", "gzip")]),
                &[CONTENT_ENCODING],
                b"x"
            )
        );

        let over = HeaderName::from_static("x-http-method-override");
        let extra = [over.clone()];
        let put = headers(&[("x-http-method-override", "PUT")]);
        let delete = headers(&[("x-http-method-override", "DELETE")]);
        assert_ne!(with(&put, &extra, b"x"), with(&delete, &extra, b"x"));
        assert_ne!(with(&put, &extra, b"x"), with(&none, &extra, b"x"));
        // Unnamed, the header does not count.
        assert_eq!(with(&put, &[], b"x"), with(&delete, &[], b"x"));
        // An empty value is a value.
        let empty = headers(&[("x-http-method-override", "")]);
        assert_ne!(with(&empty, &extra, b"x"), with(&none, &extra, b"x"));
        // Header bytes cannot pass for body bytes.
        assert_ne!(
            gzip,
            with(&none, &[], b"x\0\0\0\0\0\0\0\x10content-encoding")
        );
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
