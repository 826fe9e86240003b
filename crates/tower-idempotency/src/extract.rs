//! Where keys come from: the two key headers, the query parameter and the form field.

use std::convert::Infallible;

use bytes::Bytes;
use http::HeaderMap;
use http::header::{CONTENT_TYPE, HeaderName};

use crate::key::{IdempotencyKey, KeyError};
use crate::metrics::{Event, count};

/// The name of the query parameter and form field that carry a key (Flask-Idempotent's).
pub const FORM_FIELD: &str = "__idempotent_key";

/// The IETF draft's header.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Flask-Idempotent's header.
pub static X_IDEMPOTENT_KEY: HeaderName = HeaderName::from_static("x-idempotent-key");

/// One place a key can come from. All are on by default.
///
/// Keys come from the `Idempotency-Key` and `X-Idempotent-Key` headers, the `__idempotent_key`
/// query parameter, and the `__idempotent_key` field of a form body.
///
/// The last three are keys the page (or the client's code) chose. Sources that name different
/// keys are a conflict (400), with one exception: browsers (Firefox) add an `Idempotency-Key`
/// of their own to the POSTs of forms, `fetch()` and XHR, a new one for every click. Where the
/// page chose a key, an `Idempotency-Key` that names another one, or no valid key at all, is
/// ignored and counted ([`Event::KeyHeaderIgnored`](crate::Event::KeyHeaderIgnored)): the
/// page's key wins. Alone, the header is the key, and an invalid one is a 400. A repeated
/// `Idempotency-Key` is a 400 whatever the page chose: no browser repeats it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeySource {
    /// The `Idempotency-Key` header: an RFC 8941 sf-string, or a bare key. Where another source
    /// names a key, this header gives way to it (browsers send one of their own).
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

/// What the `Idempotency-Key` header names, kept apart from the keys the page chose.
///
/// Browsers (Firefox) add an `Idempotency-Key` of their own to form and fetch POSTs. A key the
/// page chose (the `__idempotent_key` form field or query parameter, or `X-Idempotent-Key`)
/// wins over it, so the header is weighed last, once every page source has been read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderKey {
    /// No `Idempotency-Key` header, or the source is off.
    Absent,
    /// A valid key.
    Valid(IdempotencyKey),
    /// A value that is no valid key: the error it is refused with when no page key overrides it.
    Invalid(KeyError),
    /// The header is repeated: refused whatever the page chose.
    Repeated,
}

/// The kind of form body that may carry a key, and the `Idempotency-Key` header, which is
/// weighed once the body's key is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FormKind {
    /// `application/x-www-form-urlencoded`.
    UrlEncoded {
        /// The `Idempotency-Key` header.
        header: HeaderKey,
    },
    /// `multipart/form-data`.
    Multipart {
        /// The body's boundary.
        boundary: String,
        /// The `Idempotency-Key` header.
        header: HeaderKey,
    },
}

impl FormKind {
    fn header(&self) -> &HeaderKey {
        match self {
            FormKind::UrlEncoded { header } | FormKind::Multipart { header, .. } => header,
        }
    }
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

/// Weighs the `Idempotency-Key` header against the key the page chose, if any: the page's key
/// wins, and a header that names another key, or no valid key at all, is ignored (and counted).
/// Without a page key the header is the key, and an invalid one is refused. A repeated header
/// is refused either way: no browser repeats it.
fn weigh(
    page: Option<IdempotencyKey>,
    header: HeaderKey,
) -> Result<Option<IdempotencyKey>, KeyError> {
    match (page, header) {
        (_, HeaderKey::Repeated) => Err(KeyError::Conflicting),
        (page, HeaderKey::Absent) => Ok(page),
        (None, HeaderKey::Valid(key)) => Ok(Some(key)),
        (None, HeaderKey::Invalid(e)) => Err(e),
        (Some(page), HeaderKey::Valid(key)) if page == key => Ok(Some(page)),
        (Some(page), HeaderKey::Valid(_) | HeaderKey::Invalid(_)) => {
            tracing::debug!(
                "ignoring an Idempotency-Key header that disagrees with the page's own key"
            );
            count(Event::KeyHeaderIgnored);
            Ok(Some(page))
        }
    }
}

/// The `Idempotency-Key` header, parsed but not yet weighed.
fn header_key(headers: &HeaderMap, sources: &KeySources) -> HeaderKey {
    if !sources.idempotency_key {
        return HeaderKey::Absent;
    }
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return HeaderKey::Absent;
    };
    if values.next().is_some() {
        return HeaderKey::Repeated;
    }
    match IdempotencyKey::from_header_value(value.as_bytes()) {
        Ok(key) => HeaderKey::Valid(key),
        Err(e) => HeaderKey::Invalid(e),
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

/// The key named by the request's headers and query, if any, and the kind of form body that may
/// carry one: the headers read once for both.
///
/// When the body is such a form, the `Idempotency-Key` header is left out of the key (it
/// travels in the [`FormKind`] and is weighed by [`with_form_body`]), except that a repeated one
/// is refused at once.
pub(crate) fn from_head(
    headers: &HeaderMap,
    query: Option<&str>,
    sources: &KeySources,
) -> Result<(Option<IdempotencyKey>, Option<FormKind>), KeyError> {
    let mut page = None;
    if sources.x_idempotent_key {
        page = single_header(headers, &X_IDEMPOTENT_KEY, from_plain)?;
    }
    if sources.query
        && let Some(query) = query
    {
        page = merge(page, from_pairs(form_urlencoded::parse(query.as_bytes()))?)?;
    }
    let header = header_key(headers, sources);
    if header == HeaderKey::Repeated {
        return Err(KeyError::Conflicting);
    }
    Ok(match form_encoding(headers, sources) {
        // The form's field may name the page's key: the header waits for it.
        Some(FormEncoding::UrlEncoded) => (page, Some(FormKind::UrlEncoded { header })),
        Some(FormEncoding::Multipart { boundary }) => {
            (page, Some(FormKind::Multipart { boundary, header }))
        }
        None => (weigh(page, header)?, None),
    })
}

/// How a form body that may carry a key is encoded.
enum FormEncoding {
    UrlEncoded,
    Multipart { boundary: String },
}

fn form_encoding(headers: &HeaderMap, sources: &KeySources) -> Option<FormEncoding> {
    if !sources.form {
        return None;
    }
    let ct = headers.get(CONTENT_TYPE)?;
    let essence = ct.as_bytes().split(|&b| b == b';').next()?.trim_ascii();
    if essence.eq_ignore_ascii_case(b"application/x-www-form-urlencoded") {
        Some(FormEncoding::UrlEncoded)
    } else if essence.eq_ignore_ascii_case(b"multipart/form-data") {
        multer::parse_boundary(ct.to_str().ok()?)
            .ok()
            .map(|boundary| FormEncoding::Multipart { boundary })
    } else {
        None
    }
}

/// The request's key, from the key of the head (see [`from_head`]), the key of the form body,
/// and the `Idempotency-Key` header carried by `kind`.
pub(crate) async fn with_form_body(
    head_key: Option<IdempotencyKey>,
    kind: &FormKind,
    body: &Bytes,
) -> Result<Option<IdempotencyKey>, KeyError> {
    let body_key = match kind {
        FormKind::UrlEncoded { .. } => from_pairs(form_urlencoded::parse(body))?,
        FormKind::Multipart { boundary, .. } => from_multipart(body.clone(), boundary).await?,
    };
    weigh(merge(head_key, body_key)?, kind.header().clone())
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

    /// The key of the head alone.
    fn head_key(
        headers: &HeaderMap,
        query: Option<&str>,
        sources: &KeySources,
    ) -> Result<Option<IdempotencyKey>, KeyError> {
        from_head(headers, query, sources).map(|(key, _)| key)
    }

    /// The form the body may be, from the head.
    fn form_kind(headers: &HeaderMap, sources: &KeySources) -> Option<FormKind> {
        from_head(headers, None, sources).ok()?.1
    }

    fn key(k: &str) -> Option<IdempotencyKey> {
        Some(IdempotencyKey::new(k).unwrap())
    }

    #[test]
    fn sources_agree_or_conflict() {
        let all = KeySources::all();
        let h = headers(&[("idempotency-key", "\"k1\""), ("x-idempotent-key", "k1")]);
        assert_eq!(
            head_key(&h, Some("__idempotent_key=k1"), &all),
            Ok(key("k1"))
        );
        let h = headers(&[("x-idempotent-key", "k1")]);
        assert_eq!(
            head_key(&h, Some("__idempotent_key=k2"), &all),
            Err(KeyError::Conflicting)
        );
        let h = headers(&[("idempotency-key", "k1"), ("idempotency-key", "k1")]);
        assert_eq!(head_key(&h, None, &all), Err(KeyError::Conflicting));
    }

    #[test]
    fn the_page_key_wins_over_the_idempotency_key_header() {
        let all = KeySources::all();
        let firefox = "\"8315709230293478211\"";
        let h = headers(&[("idempotency-key", firefox), ("x-idempotent-key", "page")]);
        assert_eq!(head_key(&h, None, &all), Ok(key("page")));
        let h = headers(&[("idempotency-key", firefox)]);
        assert_eq!(
            head_key(&h, Some("a=1&__idempotent_key=page"), &all),
            Ok(key("page"))
        );
        // Alone, the browser's key is the key.
        assert_eq!(head_key(&h, None, &all), Ok(key("8315709230293478211")));
        // Page sources that disagree among themselves stay a conflict, header or not.
        let h = headers(&[("idempotency-key", firefox), ("x-idempotent-key", "a")]);
        assert_eq!(
            head_key(&h, Some("__idempotent_key=b"), &all),
            Err(KeyError::Conflicting)
        );
        // A repeated header is refused whatever the page chose.
        let h = headers(&[
            ("idempotency-key", firefox),
            ("idempotency-key", "\"2\""),
            ("x-idempotent-key", "page"),
        ]);
        assert_eq!(head_key(&h, None, &all), Err(KeyError::Conflicting));
    }

    #[test]
    fn an_invalid_idempotency_key_header_is_ignored_only_beside_a_page_key() {
        let all = KeySources::all();
        for (value, error) in [
            ("\"unterminated", KeyError::Malformed),
            ("\"a b\"", KeyError::InvalidCharacter),
            ("\"\"", KeyError::Empty),
        ] {
            let h = headers(&[("idempotency-key", value), ("x-idempotent-key", "page")]);
            assert_eq!(head_key(&h, None, &all), Ok(key("page")), "{value}");
            let h = headers(&[("idempotency-key", value)]);
            assert_eq!(
                head_key(&h, Some("__idempotent_key=page"), &all),
                Ok(key("page")),
                "{value}"
            );
            assert_eq!(head_key(&h, None, &all), Err(error), "{value}");
        }
    }

    #[tokio::test]
    async fn the_header_waits_for_the_form_field() {
        let all = KeySources::all();
        let firefox = "\"8315709230293478211\"";
        let mut h = headers(&[
            ("idempotency-key", firefox),
            ("content-type", "application/x-www-form-urlencoded"),
        ]);
        assert_eq!(head_key(&h, None, &all), Ok(None), "left for the body");
        let kind = form_kind(&h, &all).unwrap();
        let field = Bytes::from_static(b"item=book&__idempotent_key=page");
        let no_field = Bytes::from_static(b"item=book");
        assert_eq!(with_form_body(None, &kind, &field).await, Ok(key("page")));
        assert_eq!(
            with_form_body(None, &kind, &no_field).await,
            Ok(key("8315709230293478211"))
        );
        // The page's own sources must still agree.
        assert_eq!(
            with_form_body(key("other"), &kind, &field).await,
            Err(KeyError::Conflicting)
        );
        assert_eq!(
            with_form_body(key("page"), &kind, &field).await,
            Ok(key("page"))
        );

        // An invalid header is ignored beside the field, and refused without it.
        h.insert("idempotency-key", HeaderValue::from_static("\"a b\""));
        assert_eq!(head_key(&h, None, &all), Ok(None));
        let kind = form_kind(&h, &all).unwrap();
        assert_eq!(with_form_body(None, &kind, &field).await, Ok(key("page")));
        assert_eq!(
            with_form_body(None, &kind, &no_field).await,
            Err(KeyError::InvalidCharacter)
        );

        // A repeated header is refused before the body is read.
        h.append("idempotency-key", HeaderValue::from_static("\"1\""));
        assert_eq!(head_key(&h, None, &all), Err(KeyError::Conflicting));
    }

    #[test]
    fn disabled_sources_are_ignored() {
        let only = KeySources::only([KeySource::XIdempotentKeyHeader]);
        let h = headers(&[("idempotency-key", "k1")]);
        assert_eq!(head_key(&h, Some("__idempotent_key=k2"), &only), Ok(None));
    }

    #[tokio::test]
    async fn multipart_field_is_found() {
        let body = Bytes::from_static(
            b"--XX\r\nContent-Disposition: form-data; name=\"item\"\r\n\r\nbook\r\n--XX\r\nContent-Disposition: form-data; name=\"__idempotent_key\"\r\n\r\nmk-1\r\n--XX--\r\n",
        );
        let kind = FormKind::Multipart {
            boundary: "XX".into(),
            header: HeaderKey::Absent,
        };
        let key = with_form_body(None, &kind, &body).await.unwrap().unwrap();
        assert_eq!(key.as_str(), "mk-1");
    }
}
