//! The query string as it is fingerprinted: removing the key parameter never panics, is
//! idempotent, leaves no `__idempotent_key` pair, and keeps every other pair in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_idempotency::__fuzz::query_without_key;
use tower_idempotency::FORM_FIELD;

fuzz_target!(|data: &[u8]| {
    let query = String::from_utf8_lossy(data);
    let stripped = query_without_key(&query);
    assert_eq!(query_without_key(&stripped), stripped, "not idempotent");
    assert!(
        form_urlencoded::parse(stripped.as_bytes()).all(|(name, _)| name != FORM_FIELD),
        "a key parameter survived"
    );
    let others = form_urlencoded::parse(query.as_bytes()).filter(|(name, _)| name != FORM_FIELD);
    assert!(
        others.eq(form_urlencoded::parse(stripped.as_bytes())),
        "another parameter was lost, changed or moved"
    );
    assert!(stripped.len() <= query.len());
});
