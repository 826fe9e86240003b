//! HTML form helpers: a fresh key in every rendered form, so a double-clicked submit button runs
//! once (the seed's `idempotent_input()`).
//!
//! ```
//! let html = format!(
//!     r#"<form method="post" action="/orders">{}<button>Pay</button></form>"#,
//!     tower_idempotency::idempotent_input()
//! );
//! assert!(html.contains(r#"name="__idempotent_key""#));
//! ```

use crate::extract::FORM_FIELD;

/// A fresh, unguessable idempotency key (a random UUID, 36 characters).
pub fn idempotent_key() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// A hidden form input carrying a fresh key under the `__idempotent_key` field name.
///
/// The markup is safe to insert into HTML as it is: the key is a UUID.
pub fn idempotent_input() -> String {
    format!(
        r#"<input type="hidden" name="{FORM_FIELD}" value="{}">"#,
        idempotent_key()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_is_fresh() {
        assert_ne!(idempotent_key(), idempotent_key());
        let input = idempotent_input();
        assert!(input.starts_with(r#"<input type="hidden" name="__idempotent_key" value=""#));
        assert_eq!(
            input.len(),
            r#"<input type="hidden" name="__idempotent_key" value="">"#.len() + 36
        );
    }
}
