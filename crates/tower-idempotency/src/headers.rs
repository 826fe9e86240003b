//! The headers the layer reads and writes beside the key: `Idempotent-Replayed` on a replay,
//! the hop-by-hop headers that are never stored or forwarded, and the client's `Prefer: wait`.

use std::time::Duration;

use http::header::{CONNECTION, DATE, SET_COOKIE};
use http::{HeaderMap, HeaderName};

/// The header that marks a replayed response.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Headers that belong to one connection (RFC 9110 section 7.6.1), never stored or forwarded.
static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Removes the hop-by-hop headers (RFC 9110 section 7.6.1) and every header that `Connection`
/// names, leaving the end-to-end headers.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which of the fixed set are there (most messages carry
    // one, `Connection`, or none); only those are looked up again to be removed.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // A name `Connection` lists is looked up as it is written, and made a `HeaderName` only when
    // such a header is there: `close` costs no allocation, and `keep-alive`, one of the fixed
    // set below, no lookup. A value of one option, as most are, is not split.
    if present & 1 != 0 {
        let mut named = Vec::new();
        for value in headers.get_all(CONNECTION) {
            let Ok(value) = value.to_str() else { continue };
            let mut listed = |token: &str| {
                if !token.eq_ignore_ascii_case("keep-alive")
                    && headers.contains_key(token)
                    && let Ok(name) = HeaderName::from_bytes(token.as_bytes())
                {
                    named.push(name);
                }
            };
            if value.as_bytes().contains(&b',') {
                value.split(',').map(str::trim).for_each(&mut listed);
            } else {
                listed(value.trim());
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Where `name` is in [`HOP_BY_HOP`], by its text: a match on the string's length and bytes
/// costs less than nine comparisons of names.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    let i = match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-authenticate" => 2,
        "proxy-authorization" => 3,
        "proxy-connection" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    };
    debug_assert_eq!(HOP_BY_HOP[i], name);
    Some(i)
}

/// Which of a response's `headers` a record keeps for replay: the end-to-end ones except
/// `Set-Cookie` (another caller's session) and `Date` (a replay gets a fresh one).
pub(crate) fn kept_for_replay(headers: &HeaderMap) -> impl Fn(&HeaderName) -> bool {
    let named = connection_named(headers);
    move |name: &HeaderName| {
        name != SET_COOKIE
            && name != DATE
            && hop_by_hop_index(name).is_none()
            && !named.contains(name)
    }
}

/// The headers the `Connection` header names (none, and no allocation, without one).
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// The `wait=N` preference of RFC 7240, in seconds.
pub(crate) fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(http::header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|pref| {
            let (name, value) = pref.split(';').next()?.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("wait") {
                return None;
            }
            let secs = value.trim().trim_matches('"').parse::<u64>().ok()?;
            Some(Duration::from_secs(secs))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn prefer_wait_is_parsed() {
        let mut h = HeaderMap::new();
        h.append("prefer", HeaderValue::from_static("respond-async, wait=5"));
        assert_eq!(prefer_wait(&h), Some(Duration::from_secs(5)));
        let mut h = HeaderMap::new();
        h.append("prefer", HeaderValue::from_static("return=minimal"));
        assert_eq!(prefer_wait(&h), None);
    }

    #[test]
    fn each_hop_by_hop_header_is_found_by_its_name() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i));
        }
        assert_eq!(hop_by_hop_index(&HeaderName::from_static("x-kept")), None);
        assert_eq!(hop_by_hop_index(&DATE), None);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, X-Private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));

        // Names that are not header names, empty ones, and a name given twice.
        let mut h = HeaderMap::new();
        h.append(
            CONNECTION,
            HeaderValue::from_static("close, , bad name, X-A"),
        );
        h.append(CONNECTION, HeaderValue::from_static("x-a, upgrade"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("close", HeaderValue::from_static("named by Connection"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
