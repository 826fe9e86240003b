//! Request fingerprints: the same key must always name the same request.

use std::fmt;

use sha2::{Digest, Sha256};

/// A SHA-256 digest of what makes a request that request: method, path, query (without the
/// `__idempotent_key` parameter), content type and body.
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
