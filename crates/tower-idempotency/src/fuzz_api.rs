//! Thin wrappers around the crate's private parsers, for the cargo-fuzz targets in `fuzz/`.
//!
//! **Not a stable API.** This module exists only with the `fuzzing` feature (off by default),
//! is hidden from the docs and may change or disappear in any release.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, HeaderName};

use crate::extract::{self, FORM_FIELD, KeySources};
use crate::key::KeyError;

/// Runs a future that never waits on anything outside itself (the form parsers read a body
/// that is already in memory) to completion on the current thread.
fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}

/// The key a request with these headers, query, content type and body names, found the way the
/// layer finds it (every source on): headers and query first, then a urlencoded or multipart
/// form body. `content_type`, when given and a valid header value, replaces any Content-Type in
/// `headers`.
pub fn extract_key(
    headers: &HeaderMap,
    query: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Option<String>, KeyError> {
    let mut headers = headers.clone();
    if let Some(value) = content_type.and_then(|ct| HeaderValue::from_str(ct).ok()) {
        headers.insert(CONTENT_TYPE, value);
    }
    let sources = KeySources::all();
    let (head_key, form) = extract::from_head(&headers, query, &sources)?;
    let key = match form {
        Some(kind) => block_on(extract::with_form_body(
            head_key,
            &kind,
            &Bytes::copy_from_slice(body),
        ))?,
        None => head_key,
    };
    Ok(key.map(|k| k.as_str().to_owned()))
}

/// The wait a `Prefer` header with this value asks for (`Prefer: wait=N`, RFC 7240), or `None`
/// when the value is no valid header value or asks for no wait.
pub fn prefer_wait(value: &[u8]) -> Option<Duration> {
    let value = HeaderValue::from_bytes(value).ok()?;
    let mut headers = HeaderMap::new();
    headers.insert(HeaderName::from_static("prefer"), value);
    crate::headers::prefer_wait(&headers)
}

/// A raw query string without its `__idempotent_key` parameters, as it is fingerprinted.
pub fn query_without_key(query: &str) -> String {
    crate::fingerprint::query_without_key(query, FORM_FIELD)
}

/// The canonical form of a `multipart/form-data` body, as it is fingerprinted, or `None` when
/// the body is no multipart form or does not parse.
pub fn canonical_multipart(content_type: &[u8], body: &[u8]) -> Option<Vec<u8>> {
    block_on(crate::fingerprint::canonical_multipart(
        content_type,
        &Bytes::copy_from_slice(body),
    ))
}
