//! Key extraction from a whole request head and body: the two key headers, the query, and
//! urlencoded and multipart form bodies. Never panics; a key it returns is valid and is the key
//! every page source (query, `X-Idempotent-Key`, form field) that names one names, and the
//! `Idempotency-Key` header's too unless a page source names it; a repeated `Idempotency-Key`
//! is refused; `None` only when no source names a key. The multipart canonical form of the
//! fingerprint is computed on the same input and must not panic either.
#![no_main]

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tower_idempotency::__fuzz::{canonical_multipart, extract_key};
use tower_idempotency::IdempotencyKey;
use tower_idempotency::FORM_FIELD;

#[derive(Arbitrary, Debug)]
enum Name<'a> {
    IdempotencyKey,
    XIdempotentKey,
    ContentType,
    Other(&'a str),
}

#[derive(Arbitrary, Debug)]
enum ContentType<'a> {
    None,
    UrlEncoded,
    Multipart { boundary: &'a str },
    Raw(&'a str),
}

#[derive(Arbitrary, Debug)]
struct Part<'a> {
    /// `None` names the key field.
    name: Option<&'a str>,
    file_name: Option<&'a str>,
    content_type: Option<&'a str>,
    data: &'a [u8],
}

#[derive(Arbitrary, Debug)]
enum Body<'a> {
    Raw(&'a [u8]),
    /// Pairs of a urlencoded form; a `None` name is the key field.
    Form(Vec<(Option<&'a str>, &'a str)>),
    /// A multipart body drawn with the content type's boundary.
    Multipart {
        parts: Vec<Part<'a>>,
        close: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    headers: Vec<(Name<'a>, &'a [u8])>,
    /// Pairs of the query; a `None` name is the key parameter.
    query: Option<Vec<(Option<&'a str>, &'a str)>>,
    raw_query: Option<&'a str>,
    content_type: ContentType<'a>,
    body: Body<'a>,
}

fn urlencode(pairs: &[(Option<&str>, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        s.append_pair(name.unwrap_or(FORM_FIELD), value);
    }
    s.finish()
}

fn multipart(boundary: &str, parts: &[Part<'_>], close: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let name = part.name.unwrap_or(FORM_FIELD);
        let mut disposition = format!("Content-Disposition: form-data; name=\"{name}\"");
        if let Some(file) = part.file_name {
            disposition.push_str(&format!("; filename=\"{file}\""));
        }
        out.extend_from_slice(disposition.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(ct) = part.content_type {
            out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(part.data);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    }
    out
}

fuzz_target!(|input: Input<'_>| {
    let mut headers = HeaderMap::new();
    for (name, value) in &input.headers {
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let name = match name {
            Name::IdempotencyKey => HeaderName::from_static("idempotency-key"),
            Name::XIdempotentKey => HeaderName::from_static("x-idempotent-key"),
            Name::ContentType => http::header::CONTENT_TYPE,
            Name::Other(n) => match HeaderName::from_bytes(n.as_bytes()) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        headers.append(name, value);
    }
    let query = match (&input.query, input.raw_query) {
        (Some(pairs), _) => Some(urlencode(pairs)),
        (None, raw) => raw.map(str::to_owned),
    };
    let (content_type, boundary) = match &input.content_type {
        ContentType::None => (None, "b".to_owned()),
        ContentType::UrlEncoded => (
            Some("application/x-www-form-urlencoded".to_owned()),
            "b".to_owned(),
        ),
        ContentType::Multipart { boundary } => (
            Some(format!("multipart/form-data; boundary={boundary}")),
            (*boundary).to_owned(),
        ),
        ContentType::Raw(ct) => (Some((*ct).to_owned()), "b".to_owned()),
    };
    let body = match &input.body {
        Body::Raw(b) => b.to_vec(),
        Body::Form(pairs) => urlencode(pairs).into_bytes(),
        Body::Multipart { parts, close } => multipart(&boundary, parts, *close),
    };

    let result = extract_key(&headers, query.as_deref(), content_type.as_deref(), &body);

    // The canonical multipart form never panics, whatever the body.
    if let Some(ct) = content_type.as_deref().or_else(|| {
        headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
    }) {
        let _ = canonical_multipart(ct.as_bytes(), &body);
    }

    // What the head names, seen from outside.
    let header_named =
        headers.contains_key("idempotency-key") || headers.contains_key("x-idempotent-key");
    let query_keys: Vec<String> = query
        .as_deref()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .filter(|(n, _)| n == FORM_FIELD)
                .map(|(_, v)| v.into_owned())
                .collect()
        })
        .unwrap_or_default();

    // Where the page itself may have named a key: the query, X-Idempotent-Key, a form body.
    let form_body = content_type
        .as_deref()
        .or_else(|| {
            headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
        })
        .map(|ct| ct.trim_start().to_ascii_lowercase())
        .is_some_and(|ct| {
            ct.starts_with("application/x-www-form-urlencoded")
                || ct.starts_with("multipart/form-data")
        });
    let page_may_name =
        !query_keys.is_empty() || headers.contains_key("x-idempotent-key") || form_body;

    // A repeated Idempotency-Key is refused, whatever else the request names.
    if headers.get_all("idempotency-key").iter().count() > 1 {
        assert!(result.is_err(), "a repeated Idempotency-Key was accepted");
    }

    match result {
        Ok(Some(key)) => {
            assert!(IdempotencyKey::new(key.as_str()).is_ok(), "an invalid key");
            for q in &query_keys {
                assert_eq!(q, &key, "the query names another key");
            }
            if let Some(v) = headers.get("x-idempotent-key") {
                assert_eq!(
                    v.as_bytes(),
                    key.as_bytes(),
                    "X-Idempotent-Key names another key"
                );
            }
            // The page's key wins over an Idempotency-Key that names another key, or no valid
            // key: such a header stands only beside a key of the page's.
            if let Some(v) = headers.get("idempotency-key") {
                let names_key = IdempotencyKey::from_header_value(v.as_bytes())
                    .is_ok_and(|k| k.as_str() == key);
                assert!(
                    names_key || page_may_name,
                    "Idempotency-Key names another key, and no page source names one"
                );
            }
        }
        Ok(None) => {
            assert!(!header_named, "a key header was ignored");
            assert!(query_keys.is_empty(), "a key parameter was ignored");
        }
        Err(_) => {}
    }
});
