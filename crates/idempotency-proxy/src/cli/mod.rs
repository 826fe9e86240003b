//! The command line: every flag, also read from `IDEMPOTENCY_PROXY_<FLAG>`, and the checks
//! that span several flags. What each flag's value may be is in [`parse`]; how the flags shape
//! the idempotency layer is in [`crate::layer`].

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use http::{HeaderName, Method};

pub(crate) mod keys;
mod parse;

pub(crate) use parse::{UrlWords, plain_http_url};

pub(crate) use parse::{
    ConflictMode, LogFormat, OtlpEndpoint, ReleaseStatus, Secret, StatusItem, StoreSpec,
};
use parse::{
    duration, parse_fingerprint_header, parse_header_name, parse_method, parse_response_size,
    parse_size, positive_duration, positive_size,
};

use crate::upstream::Upstream;

const LONG_ABOUT: &str = "\
A reverse proxy that gives any HTTP service idempotency keys.

A POST, PUT, PATCH or DELETE that carries a key (the `Idempotency-Key` header, `X-Idempotent-Key`,
or an `__idempotent_key` query parameter or form field) reaches the upstream once; every duplicate,
simultaneous or later, gets the stored response with `Idempotent-Replayed: true`. Requests without
a key, and other methods, stream through untouched. A request path with a `.` or `..` segment
(percent-encoded or not, or with backslashes for slashes) is refused with 400. An HTTP/2
connection may have 100 streams open at once.

Every flag can also be set through the environment as IDEMPOTENCY_PROXY_<FLAG>, for example
IDEMPOTENCY_PROXY_UPSTREAM=http://127.0.0.1:5000. Durations read like `500ms`, `2s`, `5m`; sizes are
bytes, with `KiB`, `MiB` or `GiB` accepted (`1MiB`). Set RUST_LOG to change the log level.

A configuration error (a bad flag, an unreachable store at start-up) prints one line and exits
with code 2. SIGTERM or SIGINT stops accepting connections, lets requests in flight finish and
store their outcomes, then exits 0.

For operators, `idempotency-proxy keys inspect|forget|in-flight` asks a shared store about keys
directly (see `idempotency-proxy keys --help`); the same is on --admin-listen with --admin-token.";

/// Put any HTTP service behind idempotency keys: each keyed request runs once, duplicates get
/// the stored response.
#[derive(Parser, Debug)]
#[command(name = "idempotency-proxy", version, about, long_about = LONG_ABOUT)]
pub(crate) struct Args {
    /// The service to proxy to, as `http://HOST:PORT[/PREFIX]`. Request paths are appended to
    /// the prefix.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_UPSTREAM",
        value_name = "URL",
        value_parser = Upstream::parse
    )]
    pub(crate) upstream: Upstream,

    /// Address the proxy listens on (HTTP/1.1 and HTTP/2 cleartext).
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub(crate) listen: SocketAddr,

    /// Address of the admin endpoints: `GET /healthz` (200 when the store answers, 503
    /// otherwise) and `GET /metrics` (Prometheus text). Off unless set.
    #[arg(long, env = "IDEMPOTENCY_PROXY_ADMIN_LISTEN", value_name = "ADDR")]
    pub(crate) admin_listen: Option<SocketAddr>,

    /// Turns on the operator's key routes on --admin-listen, behind `Authorization: Bearer
    /// TOKEN`: `GET /keys/{key}` (the record of a key, `?scope=VALUE` once per scope header,
    /// `?body=1` for the stored response), `DELETE /keys/{key}` (forget it so that it runs
    /// again; `?force=1` while in flight) and `GET /in-flight?limit=N`. Without a token they
    /// are off (404). A flag's value shows in the process list: prefer
    /// IDEMPOTENCY_PROXY_ADMIN_TOKEN or --admin-token-file.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        conflicts_with = "admin_token_file",
        value_parser = Secret::parse_admin_token
    )]
    pub(crate) admin_token: Option<Secret>,

    /// Read the admin token (see --admin-token) from this file, whole, less one trailing
    /// newline.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_ADMIN_TOKEN_FILE",
        value_name = "PATH",
        value_parser = Secret::read_admin_token
    )]
    pub(crate) admin_token_file: Option<Secret>,

    #[command(flatten)]
    pub(crate) store: StoreArgs,

    #[command(flatten)]
    pub(crate) keys: KeyArgs,

    /// How long a completed response is kept for replay.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_TTL",
        value_name = "DURATION",
        default_value = "240s",
        value_parser = positive_duration
    )]
    pub(crate) ttl: Duration,

    /// How long a duplicate waits for the original request in flight before a 409 (with
    /// `--on-conflict wait`). A client may ask for less with `Prefer: wait=N`.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_WAIT_TIMEOUT",
        value_name = "DURATION",
        default_value = "60s",
        value_parser = duration
    )]
    pub(crate) wait_timeout: Duration,

    /// How long a lease on a request in flight lives without renewal; it is renewed every third
    /// of that while the upstream works. If a proxy dies mid-request, the next attempt runs after
    /// this long.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_LOCK_TTL",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = positive_duration
    )]
    pub(crate) lock_ttl: Duration,

    /// What a duplicate does while the original is in flight: `wait` for its outcome and replay
    /// it, or `reject` with 409 and `Retry-After` at once.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_ON_CONFLICT",
        value_name = "MODE",
        default_value = "wait"
    )]
    pub(crate) on_conflict: ConflictMode,

    /// The methods that are tracked, comma-separated. Other methods always pass through.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_METHODS",
        value_name = "METHODS",
        value_delimiter = ',',
        default_value = "POST,PUT,PATCH,DELETE",
        value_parser = parse_method
    )]
    pub(crate) methods: Vec<Method>,

    /// Answer 400 to a tracked method that carries no key, instead of passing it through.
    #[arg(long, env = "IDEMPOTENCY_PROXY_REQUIRE_KEY")]
    pub(crate) require_key: bool,

    /// When the store is unavailable, pass requests through untracked (logged and counted)
    /// instead of answering 503.
    #[arg(long, env = "IDEMPOTENCY_PROXY_FAIL_OPEN")]
    pub(crate) fail_open: bool,

    /// A request header that is part of the fingerprint, beside the method, path, query,
    /// Content-Type, Content-Encoding and body: the same key sent with another value of it is a
    /// 422, not a replay. For headers that change what a request does, such as
    /// X-HTTP-Method-Override. Repeat the flag (or comma-separate in the environment) for
    /// several headers. None by default. Idempotency-Key and X-Idempotent-Key are refused.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_FINGERPRINT_HEADER",
        value_name = "NAME",
        value_delimiter = ',',
        value_parser = parse_fingerprint_header
    )]
    pub(crate) fingerprint_header: Vec<HeaderName>,

    /// The statuses that free a key, so that a retry with it runs again: status codes and
    /// classes such as `5xx`, comma-separated. Every other answer of the upstream is stored and
    /// replayed. `408,409,425,429` stores 5xx answers too (as Stripe does once an endpoint
    /// started). Whatever the list, the proxy's own 502 for an upstream it could not connect
    /// to always frees the key, and a request whose outcome is unknown never runs again.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_RELEASE_STATUS",
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "5xx,408,409,425,429",
        value_parser = StatusItem::parse
    )]
    pub(crate) release_status: Vec<StatusItem>,

    /// The largest body a tracked request may carry; larger is a 413. Untracked requests
    /// stream and have no limit.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_MAX_REQUEST_BODY",
        value_name = "BYTES",
        default_value = "1MiB",
        value_parser = parse_size
    )]
    pub(crate) max_request_body: usize,

    /// The largest response kept for replay. A larger one still reaches its caller in full;
    /// duplicates then get a 409 instead of running again. At most 4294967295 bytes (4 GiB less
    /// one byte), the longest body a stored record holds.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_MAX_RESPONSE_BODY",
        value_name = "BYTES",
        default_value = "1MiB",
        value_parser = parse_response_size
    )]
    pub(crate) max_response_body: usize,

    /// How long a caller waits for the upstream's status and headers; past it the caller gets
    /// 504. A request without a key is then cancelled. A keyed request is not: the upstream
    /// call goes on in the background with its lease held and renewed (up to
    /// --upstream-deadline), its answer is stored when it comes, and a retry with the same key
    /// replays it. Duplicates meanwhile wait or get 409.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_UPSTREAM_TIMEOUT",
        value_name = "DURATION",
        default_value = "60s",
        value_parser = positive_duration
    )]
    pub(crate) upstream_timeout: Duration,

    /// How long a keyed request may keep the upstream busy, answer and body, whether or not its
    /// caller still waits. When it passes, or when the upstream connection breaks after the
    /// request was sent, the outcome is unknown: the key answers 502 `outcome-unknown` for
    /// --ttl and the request is never sent again for it. Not shorter than --upstream-timeout.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_UPSTREAM_DEADLINE",
        value_name = "DURATION",
        default_value = "10m",
        value_parser = positive_duration
    )]
    pub(crate) upstream_deadline: Duration,

    /// How long a client has to send a request's head (request line and headers), counted from
    /// when its connection opens or its previous request ends. Past it the connection is
    /// closed: this also closes connections left idle, over HTTP/1.1 and HTTP/2 alike.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_CLIENT_HEADER_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = positive_duration
    )]
    pub(crate) client_header_timeout: Duration,

    /// How long the body of a keyed request may take to arrive in full, from the end of its
    /// head. Past it the caller gets 408 `body-timeout`: the upstream never sees the request
    /// and the key stays free for a retry. Requests without a key stream to the upstream and are
    /// not timed by it (see --upstream-timeout).
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_CLIENT_BODY_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = positive_duration
    )]
    pub(crate) client_body_timeout: Duration,

    /// The most client connections served at once, over all worker threads. Past it, new
    /// connections wait, unread, until one closes: in the listen backlog, and at most one per
    /// worker thread accepted and held.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_MAX_CONNECTIONS",
        value_name = "N",
        default_value = "10000",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub(crate) max_connections: u32,

    /// The most keyed requests running upstream at once, over all worker threads. Past it a
    /// keyed request gets 503 `too-many-in-flight` with `Retry-After`, before anything is
    /// taken: the key stays free. Requests without a key are not counted.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_MAX_IN_FLIGHT",
        value_name = "N",
        default_value = "4096",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub(crate) max_in_flight: u32,

    /// Trust the `Forwarded`, `X-Forwarded-*` and `X-Real-IP` headers clients send, because
    /// every client is a proxy of yours (a load balancer terminating TLS): the proxy appends
    /// its hop to `Forwarded` and `X-Forwarded-For` and keeps the rest, so an
    /// `X-Forwarded-Proto: https` reaches the upstream as it came. Without it those headers are
    /// dropped and written anew from the connection: anyone could forge them.
    #[arg(long, env = "IDEMPOTENCY_PROXY_TRUST_FORWARDED")]
    pub(crate) trust_forwarded: bool,

    /// How long a shutdown waits for requests in flight before exiting anyway (exit code 1).
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_SHUTDOWN_TIMEOUT",
        value_name = "DURATION",
        default_value = "60s",
        value_parser = duration
    )]
    pub(crate) shutdown_timeout: Duration,

    /// Worker threads serving requests, each with its own event loop and its own pool of
    /// upstream connections, so a request stays on one thread from accept to answer. The
    /// default is one per CPU.
    #[arg(long, env = "IDEMPOTENCY_PROXY_WORKERS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) workers: Option<u16>,

    /// Log lines as human-readable `text` or one JSON object per line (`json`). Keys are never
    /// logged, only their hashes.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text"
    )]
    pub(crate) log_format: LogFormat,

    /// Export traces over OTLP/HTTP (protobuf) to `URL/v1/traces`, for example
    /// `http://127.0.0.1:4318` (an OpenTelemetry Collector): a span for each keyed request,
    /// with its key's hash (never the key), its outcome and its wait, and child spans for the
    /// store's calls and the upstream's run. Without the flag, OTEL_EXPORTER_OTLP_ENDPOINT (a
    /// base URL as here) or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (the full URL) turns the export
    /// on. The other OTEL_* variables apply: OTEL_EXPORTER_OTLP_HEADERS, OTEL_SERVICE_NAME
    /// (default idempotency-proxy), OTEL_BSP_SCHEDULE_DELAY (ms between exports, default
    /// 5000). Spans still queued are sent at shutdown. Off unless set.
    #[arg(
        long,
        env = "IDEMPOTENCY_PROXY_OTLP_ENDPOINT",
        value_name = "URL",
        value_parser = OtlpEndpoint::base
    )]
    pub(crate) otlp_endpoint: Option<OtlpEndpoint>,
}

impl Args {
    /// Checks what no single flag's parser can: flags that must agree with each other.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.admin_token().is_some() && self.admin_listen.is_none() {
            return Err(
                "--admin-token turns on the key routes of --admin-listen, which is not set".into(),
            );
        }
        if self.upstream_timeout > self.upstream_deadline {
            return Err(format!(
                "--upstream-timeout ({}) must not be longer than --upstream-deadline ({})",
                humantime::format_duration(self.upstream_timeout),
                humantime::format_duration(self.upstream_deadline)
            ));
        }
        Ok(())
    }

    /// Where traces go: `--otlp-endpoint`, else the standard variables (read through `env`),
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` used as it is and `OTEL_EXPORTER_OTLP_ENDPOINT` as a
    /// base URL. None: no export. A bad variable is an error naming it.
    pub(crate) fn otlp_traces(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<OtlpEndpoint>, String> {
        if let Some(endpoint) = &self.otlp_endpoint {
            return Ok(Some(endpoint.clone()));
        }
        let var = |name: &str, parse: fn(&str) -> Result<OtlpEndpoint, String>| {
            env(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| parse(v.trim()).map_err(|e| format!("{name}: {e}")))
                .transpose()
        };
        match var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", OtlpEndpoint::traces)? {
            Some(endpoint) => Ok(Some(endpoint)),
            None => var("OTEL_EXPORTER_OTLP_ENDPOINT", OtlpEndpoint::base),
        }
    }

    /// The admin token, from --admin-token or --admin-token-file.
    pub(crate) fn admin_token(&self) -> Option<&Secret> {
        self.admin_token.as_ref().or(self.admin_token_file.as_ref())
    }
}

/// How a request's key becomes its storage key: `--scope-header`, `--key-secret` (or its file)
/// and `--namespace`. Shared by the server and `keys`, which must make the same storage keys;
/// global, so that `keys` takes them after its own subcommand too.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct KeyArgs {
    /// A request header whose value scopes keys, so one caller never sees another's responses.
    /// Repeat the flag (or comma-separate in the environment) for several headers.
    #[arg(
        long,
        global = true,
        env = "IDEMPOTENCY_PROXY_SCOPE_HEADER",
        value_name = "NAME",
        value_delimiter = ',',
        default_value = "Authorization",
        value_parser = parse_header_name
    )]
    pub(crate) scope_header: Vec<HeaderName>,

    /// A server secret: storage keys become an HMAC-SHA256 of (scope, key) keyed with it instead
    /// of a plain SHA-256, so that whoever can read the store cannot test guesses of keys or
    /// scopes. Every proxy sharing a store must use the same secret; setting or changing it
    /// makes earlier records unreachable. Use at least 32 random bytes. A flag's value shows in
    /// the process list: prefer IDEMPOTENCY_PROXY_KEY_SECRET or --key-secret-file.
    #[arg(
        long,
        global = true,
        env = "IDEMPOTENCY_PROXY_KEY_SECRET",
        value_name = "SECRET",
        hide_env_values = true,
        conflicts_with = "key_secret_file",
        value_parser = Secret::parse_key_secret
    )]
    pub(crate) key_secret: Option<Secret>,

    /// Read the key secret (see --key-secret) from this file, whole, less one trailing newline.
    #[arg(
        long,
        global = true,
        env = "IDEMPOTENCY_PROXY_KEY_SECRET_FILE",
        value_name = "PATH",
        value_parser = Secret::read_key_secret
    )]
    pub(crate) key_secret_file: Option<Secret>,

    /// A namespace mixed into every storage key. Services that share a store (one Redis for
    /// several proxies in front of different services) must each have their own: records of
    /// different namespaces never meet, so the same path and key sent to two services run on
    /// both. Proxies in front of one service share a namespace. Empty by default.
    #[arg(
        long,
        global = true,
        env = "IDEMPOTENCY_PROXY_NAMESPACE",
        value_name = "NAME",
        default_value = ""
    )]
    pub(crate) namespace: String,
}

impl KeyArgs {
    /// The key secret, from whichever of `--key-secret` and `--key-secret-file` was given.
    pub(crate) fn key_secret(&self) -> Option<&Secret> {
        self.key_secret.as_ref().or(self.key_secret_file.as_ref())
    }
}

/// `--store` and the options of the store it names. Global, so that `keys` takes them after its
/// own subcommand too; the server has no subcommands.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct StoreArgs {
    /// Where idempotency records live: `memory` (this process only), `redis://HOST:PORT[/DB]`,
    /// `rediss://...` (TLS), `redis+cluster://HOST:PORT[,HOST:PORT...]` (`rediss+cluster://`
    /// over TLS), or `postgres://USER@HOST:PORT/DB` (durable: records survive restarts; the
    /// table `idempotency_records` is created when missing). Proxies that share a store share
    /// their records. A password goes in the URL (`redis://:PASSWORD@HOST:PORT`) and is never
    /// logged. PostgreSQL keeps the proxy's records, not the upstream's writes, which are out of
    /// its reach: for exactly once with a database, use the library's transactional mode.
    #[arg(
        global = true,
        long = "store",
        id = "store",
        env = "IDEMPOTENCY_PROXY_STORE",
        value_name = "STORE",
        default_value = "memory",
        hide_env_values = true,
        value_parser = StoreSpec::parse
    )]
    pub(crate) spec: StoreSpec,

    /// With a Redis store: how many replicas must acknowledge each new lease and each stored
    /// response (`WAIT`, 250 ms at most) before the proxy goes on, so that a failover to one of
    /// them keeps it. A lease too few replicas acknowledged is refused (503); a response is
    /// kept all the same, logged and counted as `not_replicated`. 0 (the default) waits for no
    /// replica: Redis replicates asynchronously, and a master that dies can take its latest
    /// writes with it.
    #[arg(
        global = true,
        long,
        env = "IDEMPOTENCY_PROXY_REDIS_REPLICA_ACKS",
        value_name = "N",
        default_value_t = 0
    )]
    pub(crate) redis_replica_acks: u32,

    /// The most bytes the memory store holds: stored responses with their headers, and a few
    /// hundred bytes for each key. When it is full, the oldest stored responses make room (a
    /// retry of one runs again); when requests in flight fill it, a new key gets 503. A response
    /// too large to fit is kept as not replayable: its duplicates get 409. For `--store memory`
    /// only [default: 256MiB]
    #[arg(
        global = true,
        long,
        env = "IDEMPOTENCY_PROXY_STORE_MAX_BYTES",
        value_name = "BYTES",
        value_parser = positive_size
    )]
    pub(crate) store_max_bytes: Option<usize>,

    /// The most records the memory store holds, stored responses and requests in flight, with
    /// the same rules as --store-max-bytes: whichever bound is reached first applies. For
    /// `--store memory` only [default: 100000]
    #[arg(
        global = true,
        long,
        env = "IDEMPOTENCY_PROXY_STORE_MAX_RECORDS",
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub(crate) store_max_records: Option<u64>,
}

/// The store as it may be logged: without user name or password.
impl fmt::Display for StoreArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.spec, f)?;
        if self.redis_replica_acks > 0 {
            write!(f, " (replica acks: {})", self.redis_replica_acks)?;
        }
        Ok(())
    }
}

/// A clap error as one line, without the usage block that follows it.
pub(crate) fn one_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let head = rendered.split("\n\n").next().unwrap_or(&rendered);
    let line = head.split_whitespace().collect::<Vec<_>>().join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line).to_owned();
    format!("{line} (see --help)")
}

#[cfg(test)]
impl Args {
    /// The arguments `idempotency-proxy --upstream http://127.0.0.1:1` followed by `extra`, for
    /// tests of what the flags do.
    pub(crate) fn with_upstream(extra: &[&str]) -> Result<Self, clap::Error> {
        let mut argv = vec!["idempotency-proxy", "--upstream", "http://127.0.0.1:1"];
        argv.extend_from_slice(extra);
        Self::try_parse_from(argv)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_headers() {
        let parse = Args::with_upstream;
        assert!(parse(&[]).unwrap().fingerprint_header.is_empty());
        let a = parse(&[
            "--fingerprint-header",
            "X-HTTP-Method-Override",
            "--fingerprint-header",
            "x-variant",
        ])
        .unwrap();
        assert_eq!(
            a.fingerprint_header,
            ["x-http-method-override", "x-variant"]
        );
        for key in ["Idempotency-Key", "x-idempotent-key"] {
            let e = parse(&["--fingerprint-header", key]).unwrap_err();
            let line = one_line(&e);
            assert!(line.contains("--fingerprint-header"), "{line}");
            assert!(line.contains("idempotency key"), "{line}");
        }
    }

    #[test]
    fn flags_parse() {
        let a = Args::try_parse_from([
            "idempotency-proxy",
            "--upstream",
            "http://127.0.0.1:1",
            "--methods",
            "post,put",
            "--scope-header",
            "X-Tenant",
            "--scope-header",
            "authorization",
            "--ttl",
            "5m",
        ])
        .unwrap();
        assert_eq!(a.methods, vec![Method::POST, Method::PUT]);
        assert_eq!(a.keys.scope_header.len(), 2);
        assert_eq!(a.ttl, Duration::from_secs(300));
        assert_eq!(a.max_request_body, 1 << 20);
        assert_eq!(a.upstream_deadline, Duration::from_secs(600));
        assert!(a.validate().is_ok());
        assert_eq!(a.store.spec, StoreSpec::Memory);
        assert_eq!(a.store.redis_replica_acks, 0);
        let a = Args::try_parse_from([
            "idempotency-proxy",
            "--upstream",
            "http://127.0.0.1:1",
            "--upstream-timeout",
            "5m",
            "--upstream-deadline",
            "1m",
        ])
        .unwrap();
        let e = a.validate().unwrap_err();
        assert!(e.contains("--upstream-deadline"), "{e}");
        let a = Args::try_parse_from([
            "idempotency-proxy",
            "--upstream",
            "http://127.0.0.1:1",
            "--store",
            "redis+cluster://u:secret@a:1,b:2",
            "--redis-replica-acks",
            "1",
        ])
        .unwrap();
        assert_eq!(a.store.redis_replica_acks, 1);
        assert_eq!(
            a.store.to_string(),
            "redis+cluster://***@a:1,b:2 (replica acks: 1)"
        );
        let e = Args::try_parse_from(["idempotency-proxy"]).unwrap_err();
        let line = one_line(&e);
        assert!(line.contains("--upstream"), "{line}");
        assert!(!line.contains('\n'));
        let e = Args::try_parse_from([
            "idempotency-proxy",
            "--upstream",
            "http://h:1",
            "--ttl",
            "soon",
        ])
        .unwrap_err();
        assert!(one_line(&e).contains("--ttl"), "{}", one_line(&e));
    }

    #[test]
    fn memory_store_bounds() {
        let parse = Args::with_upstream;
        let a = parse(&[]).unwrap();
        assert_eq!(
            (a.store.store_max_bytes, a.store.store_max_records),
            (None, None)
        );
        let a = parse(&["--store-max-bytes", "2MiB", "--store-max-records", "500"]).unwrap();
        assert_eq!(a.store.store_max_bytes, Some(2 << 20));
        assert_eq!(a.store.store_max_records, Some(500));
        assert!(parse(&["--store-max-bytes", "0"]).is_err());
        assert!(parse(&["--store-max-bytes", "2MB"]).is_err());
        assert!(parse(&["--store-max-records", "0"]).is_err());
    }

    #[test]
    fn key_secrets() {
        let parse = Args::with_upstream;
        assert!(parse(&[]).unwrap().keys.key_secret().is_none());
        let a = parse(&["--key-secret", "s3cret"]).unwrap();
        assert_eq!(a.keys.key_secret().unwrap().bytes(), b"s3cret");
        assert!(
            !format!("{a:?}").contains("s3cret"),
            "the secret is never shown"
        );
        assert!(parse(&["--key-secret", ""]).is_err());

        let dir = std::env::temp_dir().join(format!("proxy-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, b"from a file\r\n").unwrap();
        let path = file.to_str().unwrap();
        let a = parse(&["--key-secret-file", path]).unwrap();
        assert_eq!(a.keys.key_secret().unwrap().bytes(), b"from a file");
        std::fs::write(&file, b"\x00\xffbinary\n\n").unwrap();
        let a = parse(&["--key-secret-file", path]).unwrap();
        assert_eq!(a.keys.key_secret().unwrap().bytes(), b"\x00\xffbinary\n");
        std::fs::write(&file, b"\n").unwrap();
        assert!(parse(&["--key-secret-file", path]).is_err());
        assert!(parse(&["--key-secret", "a", "--key-secret-file", path]).is_err());
        let missing = dir.join("missing");
        let e = parse(&["--key-secret-file", missing.to_str().unwrap()]).unwrap_err();
        assert!(
            one_line(&e).contains("--key-secret-file"),
            "{}",
            one_line(&e)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn otlp_endpoints() {
        let none = |_: &str| None;
        let a = Args::with_upstream(&[]).unwrap();
        assert_eq!(a.otlp_traces(none).unwrap(), None);
        let a = Args::with_upstream(&["--otlp-endpoint", "http://127.0.0.1:4318/"]).unwrap();
        let traces = a.otlp_traces(none).unwrap().unwrap();
        assert_eq!(traces.as_str(), "http://127.0.0.1:4318/v1/traces");
        // The flag wins over the variables.
        let env = |name: &str| (name == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c:1".into());
        assert_eq!(a.otlp_traces(env).unwrap(), Some(traces));
        let a = Args::with_upstream(&["--otlp-endpoint", "http://collector/otel"]).unwrap();
        let traces = a.otlp_traces(none).unwrap().unwrap();
        assert_eq!(traces.as_str(), "http://collector/otel/v1/traces");

        let plain = Args::with_upstream(&[]).unwrap();
        assert_eq!(
            plain.otlp_traces(env).unwrap().unwrap().as_str(),
            "http://c:1/v1/traces"
        );
        let both = |name: &str| match name {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://c:1".into()),
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => Some("http://t:2/traces".into()),
            _ => None,
        };
        assert_eq!(
            plain.otlp_traces(both).unwrap().unwrap().as_str(),
            "http://t:2/traces"
        );
        let empty = |_: &str| Some(" ".to_owned());
        assert_eq!(plain.otlp_traces(empty).unwrap(), None);
        let bad = |name: &str| (name == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "ftp://c".into());
        let e = plain.otlp_traces(bad).unwrap_err();
        assert!(e.starts_with("OTEL_EXPORTER_OTLP_ENDPOINT: "), "{e}");

        for (url, says) in [
            ("https://collector:4318", "https is not supported"),
            ("collector:4318", "http://"),
            (
                "http://user:pw@collector:4318",
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
            ("http://collector:4318/?a=1", "query"),
            ("not a url", "not a URL"),
        ] {
            let e = Args::with_upstream(&["--otlp-endpoint", url]).unwrap_err();
            let line = one_line(&e);
            assert!(line.contains("--otlp-endpoint"), "{line}");
            assert!(line.contains(says), "{url}: {line}");
        }
    }

    #[test]
    fn help_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
