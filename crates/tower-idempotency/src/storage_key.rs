//! [`StorageKey`]: where a record lives, and how the layer derives it from (namespace, scope,
//! key).

use std::fmt;

use hmac::Mac;
use sha2::{Digest, Sha256};

use crate::config::KeySecret;

/// Where a record lives: a fixed-size hash of (namespace, scope, key).
///
/// No raw key or scope ever reaches a store, so keys cannot be long, injected or read back.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageKey(pub [u8; 32]);

impl StorageKey {
    /// The key as 64 lowercase hex digits, the form networked stores use.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        self.push_hex(&mut s);
        s
    }

    /// The key written as 64 hex digits ([`to_hex`](Self::to_hex)), or `None` for anything
    /// else.
    pub fn from_hex(hex: &str) -> Option<Self> {
        // `from_str_radix` alone would take a sign, `+0`, for a digit.
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(StorageKey(key))
    }

    /// Appends the key in lower-case hex to `out`.
    pub(crate) fn push_hex(&self, out: &mut String) {
        push_hex(&self.0, out);
    }

    /// The storage key of `key` in `scope` (`None`: the global scope) under `namespace`: a hash
    /// of the three, length-prefixed and versioned. A plain SHA-256 without a key secret, an
    /// HMAC-SHA256 keyed with it otherwise, over the same input.
    pub(crate) fn derive(
        secret: Option<&KeySecret>,
        namespace: &str,
        scope: Option<&[u8]>,
        key: &[u8],
    ) -> Self {
        fn feed(
            h: &mut impl sha2::digest::Update,
            namespace: &str,
            scope: Option<&[u8]>,
            key: &[u8],
        ) {
            let scope_tag: &[u8] = if scope.is_some() { b"s" } else { b"g" };
            for part in [
                b"tower-idempotency storage v1".as_slice(),
                namespace.as_bytes(),
                scope_tag,
                scope.unwrap_or_default(),
                key,
            ] {
                h.update(&(part.len() as u64).to_be_bytes());
                h.update(part);
            }
        }
        match secret {
            None => {
                let mut h = Sha256::new();
                feed(&mut h, namespace, scope, key);
                StorageKey(h.finalize().into())
            }
            Some(secret) => {
                let mut mac = secret.0.clone();
                feed(&mut mac, namespace, scope, key);
                StorageKey(mac.finalize().into_bytes().into())
            }
        }
    }
}

/// Appends `bytes` in lower-case hex to `out`.
pub(crate) fn push_hex(bytes: &[u8], out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorageKey({})", &self.to_hex()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derive(
        secret: Option<&KeySecret>,
        namespace: &str,
        scope: Option<&[u8]>,
        key: &[u8],
    ) -> StorageKey {
        StorageKey::derive(secret, namespace, scope, key)
    }

    #[test]
    fn storage_keys_read_back_from_hex() {
        let k = derive(None, "ns", Some(b"scope"), b"key");
        assert_eq!(StorageKey::from_hex(&k.to_hex()), Some(k));
        assert_eq!(StorageKey::from_hex(&k.to_hex().to_uppercase()), Some(k));
        for bad in [
            "",
            "00",
            &"g".repeat(64),
            &"0".repeat(63),
            &"0".repeat(65),
            &"+0".repeat(32),
        ] {
            assert_eq!(StorageKey::from_hex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn storage_keys_print_as_lower_case_hex() {
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(0x0f);
        }
        let expected: String = k.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(StorageKey(k).to_hex(), expected);
        assert_eq!(StorageKey([0xff; 32]).to_hex(), "f".repeat(64));
    }

    #[test]
    fn scopes_and_namespaces_separate_keys() {
        let key = b"k";
        let a = derive(None, "", None, key);
        assert_ne!(a, derive(None, "", Some(b""), key));
        assert_ne!(a, derive(None, "ns", None, key));
        assert_ne!(
            derive(None, "", Some(b"alice"), key),
            derive(None, "", Some(b"bob"), key)
        );
    }

    /// The storage key without a secret is pinned: records written before key secrets existed
    /// stay reachable.
    #[test]
    fn the_unkeyed_storage_key_is_unchanged() {
        let mut h = Sha256::new();
        for part in [
            &b"tower-idempotency storage v1"[..],
            b"ns",
            b"s",
            b"alice",
            b"k-1",
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let expected = StorageKey(h.finalize().into());
        assert_eq!(derive(None, "ns", Some(b"alice"), b"k-1"), expected);
    }

    #[test]
    fn a_key_secret_makes_the_storage_key_an_hmac() {
        let a = KeySecret::new(b"secret a");
        let b = KeySecret::new(b"secret b");
        let plain = derive(None, "", None, b"k");
        let with_a = derive(Some(&a), "", None, b"k");
        assert_ne!(plain, with_a);
        assert_eq!(with_a, derive(Some(&a), "", None, b"k"));
        assert_ne!(with_a, derive(Some(&b), "", None, b"k"));
        // HMAC-SHA256 over the same length-prefixed input.
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(b"secret a").unwrap();
        for part in [&b"tower-idempotency storage v1"[..], b"", b"g", b"", b"k"] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        assert_eq!(with_a.0, <[u8; 32]>::from(mac.finalize().into_bytes()));
    }
}
