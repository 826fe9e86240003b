//! [`IdempotencyKey`]: parsing and validation.

use std::fmt;

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key.
///
/// A key is 1 to [`MAX_KEY_LEN`] characters of visible ASCII (`0x21..=0x7E`). The
/// `Idempotency-Key` header carries it as an RFC 8941 sf-string (`"abc"`), as the IETF draft
/// says; a bare value (`abc`, or a bare UUID) is accepted as the same key.
///
/// The raw key never reaches the store: it is hashed together with the scope and the
/// namespace into a [`StorageKey`](crate::StorageKey).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Validates `key` as an idempotency key (no sf-string unquoting).
    pub fn new(key: impl Into<String>) -> Result<Self, KeyError> {
        let key = key.into();
        validate(key.as_bytes())?;
        Ok(Self(key))
    }

    /// Parses an `Idempotency-Key` header value: an RFC 8941 sf-string, or a bare value.
    ///
    /// Parameters on the item (`"abc";p=1`) are ignored, as RFC 8941 allows.
    pub fn from_header_value(value: &[u8]) -> Result<Self, KeyError> {
        let trimmed = value.trim_ascii();
        // The common case, `"<key>"` with no escapes and no parameters, needs no sf parser: its
        // inside is the key. Anything else (escapes, parameters, bad characters) takes the
        // parser's path, so every error is the same either way.
        if let [b'"', inner @ .., b'"'] = trimmed
            && !inner.iter().any(|b| matches!(b, b'"' | b'\\'))
            && validate(inner).is_ok()
        {
            return Ok(Self(ascii(inner)));
        }
        if trimmed.first() == Some(&b'"') {
            return Self::from_sf_string(trimmed);
        }
        // A bare value: an sf-token, or anything else of visible ASCII (a UUID starts with a
        // digit, so it is no token), taken as it is.
        validate(trimmed)?;
        Ok(Self(ascii(trimmed)))
    }

    /// An sf-string item, by the sf parser.
    fn from_sf_string(item: &[u8]) -> Result<Self, KeyError> {
        let item = sfv::Parser::new(item)
            .parse::<sfv::Item>()
            .map_err(|_| KeyError::Malformed)?;
        match item.bare_item.as_string() {
            Some(s) => Self::new(s.as_str()),
            None => Err(KeyError::Malformed),
        }
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys may be secrets of a kind (guessable keys let a caller read a response): keep them
        // out of logs by default.
        f.write_str("IdempotencyKey(..)")
    }
}

/// Bytes that [`validate`] passed (visible ASCII) as a string, without the lossy decoder's
/// walk over them.
fn ascii(key: &[u8]) -> String {
    std::str::from_utf8(key)
        .map_or_else(|_| String::from_utf8_lossy(key).into_owned(), str::to_owned)
}

fn validate(key: &[u8]) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    if !key.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(KeyError::InvalidCharacter);
    }
    Ok(())
}

/// Why a key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty.
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`].
    TooLong,
    /// The key has a character outside visible ASCII.
    InvalidCharacter,
    /// The `Idempotency-Key` header is not an sf-string nor a bare key.
    Malformed,
    /// The request names the key more than once, in one source or in several, with
    /// different values or in a repeated header. (An `Idempotency-Key` header that disagrees
    /// with a key the page chose is ignored instead; see [`KeySource`](crate::KeySource).)
    Conflicting,
    /// A covered request came without a key while keys are required.
    Missing,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyError::Empty => "the idempotency key is empty",
            KeyError::TooLong => "the idempotency key is longer than 255 characters",
            KeyError::InvalidCharacter => {
                "the idempotency key must be visible ASCII characters (0x21 to 0x7E)"
            }
            KeyError::Malformed => {
                "the Idempotency-Key header must be a structured-field string such as \"abc\""
            }
            KeyError::Conflicting => {
                "the request names more than one idempotency key (a repeated header or sources that disagree)"
            }
            KeyError::Missing => "this endpoint requires an idempotency key",
        })
    }
}

impl std::error::Error for KeyError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sf_string_and_bare_token_are_one_key() {
        let quoted = IdempotencyKey::from_header_value(br#""abc""#).unwrap();
        let bare = IdempotencyKey::from_header_value(b"abc").unwrap();
        assert_eq!(quoted, bare);
        assert_eq!(quoted.as_str(), "abc");
    }

    proptest::proptest! {
        /// The quick path for plain quoted keys answers exactly as the sf parser does.
        #[test]
        fn quoted_keys_read_as_the_sf_parser_reads_them(
            inner in proptest::collection::vec(
                proptest::prop_oneof![Just(b'"'), Just(b'\\'), Just(b' '), Just(b';'), 0x1fu8..0x81],
                0..300,
            ),
        ) {
            let mut value = vec![b'"'];
            value.extend_from_slice(&inner);
            value.push(b'"');
            proptest::prop_assert_eq!(
                IdempotencyKey::from_header_value(&value),
                IdempotencyKey::from_sf_string(&value)
            );
        }
    }

    use proptest::strategy::Just;

    #[test]
    fn bare_uuid_is_accepted() {
        let k = IdempotencyKey::from_header_value(b"8e03978e-40d5-43e8-bc93-6894a57f9324").unwrap();
        assert_eq!(k.as_str(), "8e03978e-40d5-43e8-bc93-6894a57f9324");
    }

    #[test]
    fn quoted_escapes_are_unquoted() {
        let k = IdempotencyKey::from_header_value(br#""a\"b""#).unwrap();
        assert_eq!(k.as_str(), "a\"b");
    }

    #[test]
    fn bad_keys_are_refused() {
        assert_eq!(
            IdempotencyKey::from_header_value(b"\"\""),
            Err(KeyError::Empty)
        );
        assert_eq!(IdempotencyKey::from_header_value(b""), Err(KeyError::Empty));
        assert_eq!(
            IdempotencyKey::from_header_value(b"\"abc"),
            Err(KeyError::Malformed)
        );
        assert_eq!(
            IdempotencyKey::from_header_value(b"\"a b\""),
            Err(KeyError::InvalidCharacter)
        );
        assert_eq!(
            IdempotencyKey::from_header_value(b"a b"),
            Err(KeyError::InvalidCharacter)
        );
        let long = format!("\"{}\"", "k".repeat(256));
        assert_eq!(
            IdempotencyKey::from_header_value(long.as_bytes()),
            Err(KeyError::TooLong)
        );
        let max = "k".repeat(255);
        assert!(IdempotencyKey::from_header_value(max.as_bytes()).is_ok());
        assert_eq!(
            IdempotencyKey::new("caf\u{e9}"),
            Err(KeyError::InvalidCharacter)
        );
    }
}
