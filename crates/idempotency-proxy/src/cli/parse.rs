//! What each flag's value may be: the parsers clap calls, and the types they give.

use std::fmt;
use std::time::Duration;

use clap::ValueEnum;
use http::uri::Authority;
use http::{HeaderName, Method, Uri};

/// A secret given as a flag or kept in a file (`--key-secret`, `--admin-token` and their
/// `-file` forms): bytes that never show in logs or `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(Vec<u8>);

impl Secret {
    /// `--key-secret`.
    pub(super) fn parse_key_secret(s: &str) -> Result<Self, String> {
        Self::parse(s, "key secret")
    }

    /// `--key-secret-file`.
    pub(super) fn read_key_secret(path: &str) -> Result<Self, String> {
        Self::read_file(path, "key secret")
    }

    /// `--admin-token`.
    pub(super) fn parse_admin_token(s: &str) -> Result<Self, String> {
        Self::parse(s, "admin token")
    }

    /// `--admin-token-file`.
    pub(super) fn read_admin_token(path: &str) -> Result<Self, String> {
        Self::read_file(path, "admin token")
    }

    /// The flag's value, which must not be empty; `what` names it in the error.
    fn parse(s: &str, what: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err(format!("the {what} must not be empty"));
        }
        Ok(Self(s.as_bytes().to_vec()))
    }

    /// A file's whole content less one trailing newline (`\n` or `\r\n`), which must not be
    /// empty; `what` names it in the error.
    fn read_file(path: &str, what: &str) -> Result<Self, String> {
        let mut bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        if bytes.is_empty() {
            return Err(format!("{path} holds no {what}"));
        }
        Ok(Self(bytes))
    }

    /// The secret's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// An item of `--release-status`: a status code, or a class of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusItem {
    /// One status code, 100 to 599.
    Code(u16),
    /// A class: `5xx` is 5.
    Class(u8),
}

impl StatusItem {
    pub(super) fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let usage =
            || format!("`{t}` is neither a status code (100 to 599) nor a class such as 5xx");
        let bytes = t.as_bytes();
        match bytes {
            [class @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => Ok(Self::Class(class - b'0')),
            [b'1'..=b'5', b'0'..=b'9', b'0'..=b'9'] => {
                t.parse().map(Self::Code).map_err(|_| usage())
            }
            _ => Err(usage()),
        }
    }
}

/// The statuses of `--release-status`, looked up in one step.
#[derive(Clone)]
pub(crate) struct ReleaseStatus(Vec<bool>);

impl ReleaseStatus {
    /// The set of `items`.
    pub(crate) fn new(items: &[StatusItem]) -> Self {
        let mut set = vec![false; 600];
        for item in items {
            match *item {
                StatusItem::Code(code) => set[usize::from(code)] = true,
                StatusItem::Class(class) => {
                    let first = usize::from(class) * 100;
                    set[first..first + 100].fill(true);
                }
            }
        }
        Self(set)
    }

    /// Whether `status` frees its key. A status past 599, which no list can name, does.
    pub(crate) fn releases(&self, status: http::StatusCode) -> bool {
        self.0
            .get(usize::from(status.as_u16()))
            .copied()
            .unwrap_or(true)
    }
}

/// What [`plain_http_url`] says of a URL that is not one, in the words of the flag it is for.
pub(crate) struct UrlWords {
    /// For an `https://` URL.
    pub(crate) https: &'static str,
    /// A URL the flag takes, shown for one of another scheme.
    pub(crate) example: &'static str,
    /// For a URL with a user name or password.
    pub(crate) credentials: &'static str,
    /// For a URL with a query.
    pub(crate) query: &'static str,
}

/// A plain `http://HOST[:PORT][/PATH]` URL, as `--upstream` and `--otlp-endpoint` take: no
/// TLS, no user name or password, no query. Returns it with its authority.
pub(crate) fn plain_http_url(s: &str, words: &UrlWords) -> Result<(Uri, Authority), String> {
    let uri: Uri = s
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected http://HOST:PORT"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(words.https.into()),
        _ => return Err(format!("expected an http:// URL such as {}", words.example)),
    }
    let authority = match uri.authority() {
        Some(a) if !a.host().is_empty() => a.clone(),
        _ => return Err("the URL has no host; expected http://HOST:PORT".into()),
    };
    if authority.as_str().contains('@') {
        return Err(words.credentials.into());
    }
    if uri.query().is_some() {
        return Err(words.query.into());
    }
    Ok((uri, authority))
}

/// Where traces go over OTLP/HTTP: the full URL of the traces endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OtlpEndpoint(String);

impl OtlpEndpoint {
    /// A base URL (`--otlp-endpoint`, `OTEL_EXPORTER_OTLP_ENDPOINT`): traces go to
    /// `URL/v1/traces`.
    pub(crate) fn base(s: &str) -> Result<Self, String> {
        Self::check(s)?;
        Ok(Self(format!("{}/v1/traces", s.trim_end_matches('/'))))
    }

    /// The traces URL itself (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), used as it is.
    pub(crate) fn traces(s: &str) -> Result<Self, String> {
        Self::check(s)?;
        Ok(Self(s.to_owned()))
    }

    fn check(s: &str) -> Result<(), String> {
        plain_http_url(
            s,
            &UrlWords {
                https: "https is not supported; send traces to a collector's plain http:// \
                        address (an OpenTelemetry Collector beside the proxy)",
                example: "http://127.0.0.1:4318",
                credentials: "user names and passwords in the URL are not supported; set \
                              OTEL_EXPORTER_OTLP_HEADERS for the collector's credentials",
                query: "the URL must not carry a query",
            },
        )
        .map(|_| ())
    }

    /// The traces endpoint's URL.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OtlpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `--on-conflict`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ConflictMode {
    /// Wait for the original's outcome and replay it.
    Wait,
    /// Answer 409 with Retry-After at once.
    Reject,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `--store`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum StoreSpec {
    /// The embedded memory store.
    Memory,
    /// A Redis URL: `redis://`, `rediss://`, `redis+cluster://` or `rediss+cluster://`.
    Redis(String),
    /// A PostgreSQL URL: `postgres://` or `postgresql://`.
    Postgres(String),
}

impl StoreSpec {
    pub(super) fn parse(s: &str) -> Result<Self, String> {
        if s == "memory" {
            return Ok(Self::Memory);
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(store_usage());
        };
        let postgres = matches!(scheme, "postgres" | "postgresql");
        if !postgres
            && !matches!(
                scheme,
                "redis" | "rediss" | "redis+cluster" | "rediss+cluster"
            )
        {
            return Err(store_usage());
        }
        let hosts = rest.rsplit('@').next().unwrap_or(rest);
        let hosts = hosts.split(['/', '?']).next().unwrap_or(hosts);
        if hosts.is_empty() || hosts.split(',').any(|h| h.trim().is_empty()) {
            return Err(format!("{scheme}:// URL names no host; {}", store_usage()));
        }
        Ok(if postgres {
            Self::Postgres(s.to_owned())
        } else {
            Self::Redis(s.to_owned())
        })
    }
}

fn store_usage() -> String {
    "expected `memory`, `redis://HOST:PORT[/DB]`, `rediss://HOST:PORT[/DB]`, \
     `redis+cluster://HOST:PORT[,HOST:PORT...]` or `postgres://USER@HOST:PORT/DB`"
        .into()
}

/// Never shows a password.
impl fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The store as it may be logged: without user name or password.
impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Memory => f.write_str("memory"),
            StoreSpec::Redis(url) | StoreSpec::Postgres(url) => match url.split_once("://") {
                Some((scheme, rest)) => {
                    // The query may carry a password too (`?password=`): never shown.
                    let rest = rest.split('?').next().unwrap_or(rest);
                    match rest.rsplit_once('@') {
                        Some((_, hosts)) => write!(f, "{scheme}://***@{hosts}"),
                        None => write!(f, "{scheme}://{rest}"),
                    }
                }
                None => f.write_str("store"),
            },
        }
    }
}

/// A duration such as `500ms`, `2s` or `5m`.
pub(super) fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e}; expected a duration such as 500ms, 2s or 5m"))
}

/// A duration above zero.
pub(super) fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// A size in bytes: `1048576`, `512KiB`, `1MiB`, `1 GiB`.
pub(super) fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err("expected a number of bytes, such as 65536, 512KiB or 1MiB".into());
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| "number of bytes too large".to_owned())?;
    let unit = unit.trim();
    let factor: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "unknown size unit `{unit}`; use bytes or KiB, MiB, GiB"
            ));
        }
    };
    n.checked_mul(factor)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| "size too large".to_owned())
}

/// A size above zero.
pub(super) fn positive_size(s: &str) -> Result<usize, String> {
    match parse_size(s)? {
        0 => Err("must be more than zero".into()),
        n => Ok(n),
    }
}

/// A size no larger than the longest body a stored record holds.
pub(super) fn parse_response_size(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    if n > tower_idempotency::record::MAX_BODY_LEN {
        return Err(format!(
            "at most {} bytes (4 GiB less one byte): a stored record holds no longer body",
            tower_idempotency::record::MAX_BODY_LEN
        ));
    }
    Ok(n)
}

pub(super) fn parse_method(s: &str) -> Result<Method, String> {
    let s = s.trim().to_ascii_uppercase();
    if s.is_empty() {
        return Err("empty method name".into());
    }
    Method::from_bytes(s.as_bytes()).map_err(|_| format!("`{s}` is not an HTTP method"))
}

pub(super) fn parse_header_name(s: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(s.trim().as_bytes())
        .map_err(|_| format!("`{}` is not a valid header name", s.trim()))
}

/// A header name that may be fingerprinted: any but the headers that carry the key.
pub(super) fn parse_fingerprint_header(s: &str) -> Result<HeaderName, String> {
    let name = parse_header_name(s)?;
    let key_headers = [
        &tower_idempotency::IDEMPOTENCY_KEY,
        &tower_idempotency::X_IDEMPOTENT_KEY,
    ];
    if key_headers.contains(&&name) {
        return Err(format!(
            "`{}` carries the idempotency key and cannot be a fingerprint header",
            s.trim()
        ));
    }
    Ok(name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Args;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2 mib"), Ok(2 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("1MB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert_eq!(parse_response_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_response_size("4294967295"), Ok(u32::MAX as usize));
        assert!(parse_response_size("4GiB").is_err());
        assert!(parse_response_size("5GiB").is_err());
    }

    #[test]
    fn stores() {
        assert!(StoreSpec::parse("memory") == Ok(StoreSpec::Memory));
        assert!(StoreSpec::parse("redis://127.0.0.1:6379/2").is_ok());
        assert!(StoreSpec::parse("rediss://u:p@h:6380").is_ok());
        assert!(StoreSpec::parse("redis+cluster://a:1,b:2").is_ok());
        assert!(StoreSpec::parse("redis+cluster://a:1,").is_err());
        assert!(StoreSpec::parse("redis://").is_err());
        assert!(matches!(
            StoreSpec::parse("postgres://shop@db:5432/shop"),
            Ok(StoreSpec::Postgres(_))
        ));
        assert!(StoreSpec::parse("postgresql://db/shop?sslmode=require").is_ok());
        assert!(StoreSpec::parse("postgres:///shop").is_err());
        assert!(StoreSpec::parse("mysql://db/shop").is_err());
        assert!(StoreSpec::parse("mem").is_err());
        let s = StoreSpec::parse("redis://user:secret@h:6379").unwrap();
        assert_eq!(s.to_string(), "redis://***@h:6379");
        assert!(!format!("{s:?}").contains("secret"));
        let s = StoreSpec::parse("postgres://shop:secret@db/shop?password=other").unwrap();
        assert_eq!(s.to_string(), "postgres://***@db/shop");
        assert!(!format!("{s:?}").contains("secret") && !s.to_string().contains("other"));
    }

    #[test]
    fn release_statuses() {
        use http::StatusCode;
        let parse = |list: &str| {
            Args::try_parse_from([
                "idempotency-proxy",
                "--upstream",
                "http://h:1",
                "--release-status",
                list,
            ])
            .map(|a| ReleaseStatus::new(&a.release_status))
        };
        let default = Args::try_parse_from(["idempotency-proxy", "--upstream", "http://h:1"])
            .map(|a| ReleaseStatus::new(&a.release_status))
            .unwrap();
        for code in 100..1000u16 {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(
                default.releases(status),
                !tower_idempotency::default_storable(status),
                "the default list is the library's default, {code}"
            );
        }
        let stripe = parse("408,409,425,429").unwrap();
        assert!(!stripe.releases(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(stripe.releases(StatusCode::TOO_MANY_REQUESTS));
        assert!(!stripe.releases(StatusCode::NOT_FOUND));
        let classes = parse("4XX, 503").unwrap();
        assert!(classes.releases(StatusCode::NOT_FOUND));
        assert!(classes.releases(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!classes.releases(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!classes.releases(StatusCode::CREATED));
        for bad in ["6xx", "99", "600", "5x", "abc", "", "50O", "0xx"] {
            assert!(parse(bad).is_err(), "{bad:?} is refused");
        }
    }
}
