//! `Prefer` header values (RFC 7240): parsing never panics, and a wait it finds is one the value
//! spells out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_idempotency::__fuzz::prefer_wait;

fuzz_target!(|data: &[u8]| {
    if let Some(wait) = prefer_wait(data) {
        let text = String::from_utf8_lossy(data).to_ascii_lowercase();
        assert!(text.contains("wait"), "a wait from a value without one");
        assert!(
            text.contains(&wait.as_secs().to_string()),
            "a wait of {wait:?} that the value does not name"
        );
    }
});
