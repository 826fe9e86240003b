//! `Idempotency-Key` header values, sf-string or bare: parsing never panics, an accepted key is
//! always a valid key, and it survives being quoted as an sf-string or sent bare again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_idempotency::IdempotencyKey;
use tower_idempotency::MAX_KEY_LEN;

fn is_valid(key: &str) -> bool {
    (1..=MAX_KEY_LEN).contains(&key.len()) && key.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn sf_quote(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    out.push('"');
    for c in key.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = IdempotencyKey::from_header_value(data) {
        assert!(is_valid(key.as_str()), "accepted an invalid key");
        assert_eq!(IdempotencyKey::new(key.as_str()).as_ref(), Ok(&key));
        // The same key as an sf-string is the same key.
        let quoted = sf_quote(key.as_str());
        assert_eq!(
            IdempotencyKey::from_header_value(quoted.as_bytes()).as_ref(),
            Ok(&key)
        );
        // And bare, unless it starts with a quote (then it is read as a broken sf-string).
        if !key.as_str().starts_with('"') {
            assert_eq!(
                IdempotencyKey::from_header_value(key.as_str().as_bytes()).as_ref(),
                Ok(&key)
            );
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        assert_eq!(IdempotencyKey::new(s).is_ok(), is_valid(s));
    }
});
