//! HTML form helpers: a fresh key in every rendered form.

use crate::extract::FORM_FIELD;

/// A fresh, unguessable idempotency key (a random UUID, 36 characters).
pub fn idempotent_key() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// A hidden form input carrying a fresh key under the `__idempotent_key` field name
/// (Flask-Idempotent's `idempotent_input()`): with a fresh key in every rendered form, a
/// double-clicked submit button runs once.
///
/// The markup is safe to insert into HTML as it is: the key is a UUID.
///
/// ```
/// let html = format!(
///     r#"<form method="post" action="/orders">{}<button>Pay</button></form>"#,
///     tower_idempotency::idempotent_input()
/// );
/// assert!(html.contains(r#"name="__idempotent_key""#));
/// ```
///
/// With the `minijinja` feature, `tower_idempotency::minijinja::register` makes both helpers
/// template functions, so a template says `{{ idempotent_input() }}` as in Flask-Idempotent.
/// From askama, call the function by path and mark it safe (the markup holds nothing but a
/// UUID):
///
/// ```
/// use askama::Template;
///
/// #[derive(Template)]
/// #[template(
///     source = r#"<form method="post">{{ tower_idempotency::idempotent_input()|safe }}<button>Pay</button></form>"#,
///     ext = "html"
/// )]
/// struct PayForm;
///
/// let html = PayForm.render().unwrap();
/// assert!(html.contains(r#"<input type="hidden" name="__idempotent_key" value=""#));
/// ```
pub fn idempotent_input() -> String {
    format!(
        r#"<input type="hidden" name="{FORM_FIELD}" value="{}">"#,
        idempotent_key()
    )
}

/// The helpers as minijinja template functions (feature `minijinja`).
#[cfg(feature = "minijinja")]
pub mod minijinja {
    use minijinja::{Environment, Value};

    /// Registers `idempotent_input()` (markup marked safe, so it is not escaped) and
    /// `idempotent_key()` in `env`. Each call renders a fresh key, so each rendered form is one
    /// submission however often it is sent.
    ///
    /// ```
    /// let mut env = minijinja::Environment::new();
    /// tower_idempotency::minijinja::register(&mut env);
    /// env.add_template("order", r#"<form method="post">{{ idempotent_input() }}</form>"#).unwrap();
    /// let html = env.get_template("order").unwrap().render(()).unwrap();
    /// assert!(html.contains(r#"<input type="hidden" name="__idempotent_key" value=""#));
    /// ```
    pub fn register(env: &mut Environment<'_>) {
        env.add_function("idempotent_input", || {
            Value::from_safe_string(super::idempotent_input())
        });
        env.add_function("idempotent_key", super::idempotent_key);
    }
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
