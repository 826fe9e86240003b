//! Where keys come from: the `Idempotency-Key` and `X-Idempotent-Key` headers, the
//! `__idempotent_key` query parameter, and the `__idempotent_key` field of a form body.

use std::convert::Infallible;

use bytes::Bytes;
use http::HeaderMap;
use http::header::{CONTENT_TYPE, HeaderName};

use crate::key::{IdempotencyKey, KeyError};

/// The name of the query parameter and form field that carry a key (the seed's).
pub const FORM_FIELD: &str = "__idempotent_key";

/// The IETF draft's header.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The seed's header.
pub static X_IDEMPOTENT_KEY: HeaderName = HeaderName::from_static("x-idempotent-key");

/// One place a key can come from. All are on by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeySource {
    /// The `Idempotency-Key` header: an RFC 8941 sf-string, or a bare key.
    IdempotencyKeyHeader,
    /// The `X-Idempotent-Key` header, taken as it is.
    XIdempotentKeyHeader,
    /// The `__idempotent_key` query parameter.
    QueryParameter,
    /// The `__idempotent_key` field of an `application/x-www-form-urlencoded` or
    /// `multipart/form-data` body.
    FormField,
}

/// A set of [`KeySource`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySources {
    idempotency_key: bool,
    x_idempotent_key: bool,
    query: bool,
    form: bool,
}

impl Default for KeySources {
    fn default() -> Self {
        Self::all()
    }
}

impl KeySources {
    /// Every source.
    pub fn all() -> Self {
        Self {
            idempotency_key: true,
            x_idempotent_key: true,
            query: true,
            form: true,
        }
    }

    /// Exactly the given sources.
    pub fn only(sources: impl IntoIterator<Item = KeySource>) -> Self {
        let mut s = Self {
            idempotency_key: false,
            x_idempotent_key: false,
            query: false,
            form: false,
        };
        for source in sources {
            match source {
                KeySource::IdempotencyKeyHeader => s.idempotency_key = true,
                KeySource::XIdempotentKeyHeader => s.x_idempotent_key = true,
                KeySource::QueryParameter => s.query = true,
                KeySource::FormField => s.form = true,
            }
        }
        s
    }

    /// Whether `source` is in the set.
    pub fn contains(&self, source: KeySource) -> bool {
        match source {
            KeySource::IdempotencyKeyHeader => self.idempotency_key,
            KeySource::XIdempotentKeyHeader => self.x_idempotent_key,
            KeySource::QueryParameter => self.query,
            KeySource::FormField => self.form,
        }
    }
}

/// The kind of form body that may carry a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FormKind {
    UrlEncoded,
    Multipart { boundary: String },
}

/// Merges two sightings of a key: the same key twice is one key, two different keys a conflict.
fn merge(
    a: Option<IdempotencyKey>,
    b: Option<IdempotencyKey>,
) -> Result<Option<IdempotencyKey>, KeyError> {
    match (a, b) {
        (Some(a), Some(b)) if a != b => Err(KeyError::Conflicting),
        (a, b) => Ok(a.or(b)),
    }
}

fn single_header(
    headers: &HeaderMap,
    name: &HeaderName,
    parse: fn(&[u8]) -> Result<IdempotencyKey, KeyError>,
) -> Result<Option<IdempotencyKey>, KeyError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Conflicting);
    }
    parse(value.as_bytes()).map(Some)
}

fn from_plain(value: &[u8]) -> Result<IdempotencyKey, KeyError> {
    std::str::from_utf8(value)
        .map_err(|_| KeyError::InvalidCharacter)
        .and_then(IdempotencyKey::new)
}

fn from_pairs<'a>(
    pairs: impl Iterator<Item = (std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>,
) -> Result<Option<IdempotencyKey>, KeyError> {
    let mut found = None;
    for (name, value) in pairs {
        if name == FORM_FIELD {
            found = merge(found, Some(IdempotencyKey::new(value.into_owned())?))?;
        }
    }
    Ok(found)
}

/// The key named by the request's headers and query, if any.
pub(crate) fn from_head(
    headers: &HeaderMap,
    query: Option<&str>,
    sources: &KeySources,
) -> Result<Option<IdempotencyKey>, KeyError> {
    let mut key = None;
    if sources.idempotency_key {
        key = single_header(headers, &IDEMPOTENCY_KEY, IdempotencyKey::from_header_value)?;
    }
    if sources.x_idempotent_key {
        key = merge(key, single_header(headers, &X_IDEMPOTENT_KEY, from_plain)?)?;
    }
    if sources.query
        && let Some(query) = query
    {
        key = merge(key, from_pairs(form_urlencoded::parse(query.as_bytes()))?)?;
    }
    Ok(key)
}

/// Whether the body is a form that may carry a key.
pub(crate) fn form_kind(headers: &HeaderMap, sources: &KeySources) -> Option<FormKind> {
    if !sources.form {
        return None;
    }
    let ct = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Some(FormKind::UrlEncoded)
    } else if essence.eq_ignore_ascii_case("multipart/form-data") {
        multer::parse_boundary(ct)
            .ok()
            .map(|boundary| FormKind::Multipart { boundary })
    } else {
        None
    }
}

/// Merges the key of a form body into the key from the head.
pub(crate) async fn with_form_body(
    head_key: Option<IdempotencyKey>,
    kind: &FormKind,
    body: &Bytes,
) -> Result<Option<IdempotencyKey>, KeyError> {
    let body_key = match kind {
        FormKind::UrlEncoded => from_pairs(form_urlencoded::parse(body))?,
        FormKind::Multipart { boundary } => from_multipart(body.clone(), boundary).await?,
    };
    merge(head_key, body_key)
}

async fn from_multipart(body: Bytes, boundary: &str) -> Result<Option<IdempotencyKey>, KeyError> {
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut found = None;
    // A malformed multipart body carries no key we can trust past the damage: stop there. The
    // layer then refuses a tracked request (400 `form-malformed`) and lets the handler judge
    // an untracked one.
    while let Ok(Some(field)) = multipart.next_field().await {
        if field.name() == Some(FORM_FIELD) {
            let text = field.text().await.map_err(|_| KeyError::InvalidCharacter)?;
            found = merge(found, Some(IdempotencyKey::new(text)?))?;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn sources_agree_or_conflict() {
        let all = KeySources::all();
        let h = headers(&[("idempotency-key", "\"k1\""), ("x-idempotent-key", "k1")]);
        assert_eq!(
            from_head(&h, Some("__idempotent_key=k1"), &all)
                .unwrap()
                .unwrap()
                .as_str(),
            "k1"
        );
        let h = headers(&[("idempotency-key", "\"k1\""), ("x-idempotent-key", "k2")]);
        assert_eq!(from_head(&h, None, &all), Err(KeyError::Conflicting));
        let h = headers(&[("idempotency-key", "k1")]);
        assert_eq!(
            from_head(&h, Some("__idempotent_key=k2"), &all),
            Err(KeyError::Conflicting)
        );
        let h = headers(&[("idempotency-key", "k1"), ("idempotency-key", "k1")]);
        assert_eq!(from_head(&h, None, &all), Err(KeyError::Conflicting));
    }

    #[test]
    fn disabled_sources_are_ignored() {
        let only = KeySources::only([KeySource::XIdempotentKeyHeader]);
        let h = headers(&[("idempotency-key", "k1")]);
        assert_eq!(from_head(&h, Some("__idempotent_key=k2"), &only), Ok(None));
    }

    #[tokio::test]
    async fn multipart_field_is_found() {
        let body = Bytes::from_static(
            b"--XX\r\nContent-Disposition: form-data; name=\"item\"\r\n\r\nbook\r\n--XX\r\nContent-Disposition: form-data; name=\"__idempotent_key\"\r\n\r\nmk-1\r\n--XX--\r\n",
        );
        let kind = FormKind::Multipart {
            boundary: "XX".into(),
        };
        let key = with_form_body(None, &kind, &body).await.unwrap().unwrap();
        assert_eq!(key.as_str(), "mk-1");
    }
}
