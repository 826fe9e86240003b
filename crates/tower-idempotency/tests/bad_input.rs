//! Bad input, row by row, through a real axum server on 127.0.0.1:0: a real HTTP client
//! (reqwest) for what a client library can send, raw TCP for malformed HTTP it refuses to send.
//!
//! Every refused row must be answered with its documented 4xx (`application/problem+json` from
//! the layer, or a plain 400 from the HTTP server itself for framing it cannot parse), must never
//! run the handler, and must leave nothing behind: the store (a real `MemoryStore`, wrapped to
//! record its calls) holds no record or lease and was not even asked. Each row gets a server and
//! store of its own, and names itself in every assertion.
//!
//! Invalid `Prefer: wait=` values are not refused: the preference is ignored, so the request is
//! served normally and a duplicate waits the configured time, as if no preference were sent.

#![allow(missing_docs, clippy::unwrap_used)]

use idempotency_test_support::harness;
use idempotency_test_support::recording;

use std::net::SocketAddr;
use std::time::Duration;

use harness::{Counter, Gate, Reply, TestServer, assert_problem, client, send, serve};
use http::{HeaderValue, StatusCode};
use recording::RecordingStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_idempotency::IdempotencyLayer;

/// The request body limit of these tests' layer.
const LIMIT: usize = 64 * 1024;

fn layer(store: &RecordingStore) -> IdempotencyLayer {
    IdempotencyLayer::new(store.clone())
        .with_max_request_body(LIMIT)
        .with_wait_timeout(Duration::from_secs(10))
}

/// What a row sends.
enum Send {
    /// A request built with reqwest from the client and the base URL.
    Client(fn(&reqwest::Client, &str) -> reqwest::RequestBuilder),
    /// Raw bytes over TCP; then the client half-closes (shuts its writing side and reads the
    /// answer) or closes the connection altogether without reading.
    Raw { bytes: Vec<u8>, then: Then },
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Then {
    HalfClose,
    Close,
}

/// What a row must get back.
enum Expect {
    /// The layer's problem+json with this status and `type` slug.
    Problem(u16, &'static str),
    /// The HTTP server's own refusal of framing it cannot parse (hyper: a plain 400 before any
    /// service sees a request).
    ServerRefusal(u16),
    /// No answer can be read: the client closed the connection. What holds is that nothing
    /// ran and nothing was stored.
    ClientGone,
}

struct Row {
    name: &'static str,
    send: Send,
    expect: Expect,
}

fn row(name: &'static str, send: Send, expect: Expect) -> Row {
    Row { name, send, expect }
}

fn long_key() -> String {
    "k".repeat(256)
}

/// A multipart body with these (name, value) text fields and boundary `XYZ`.
fn multipart(fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(b"--XYZ\r\nContent-Disposition: form-data; name=\"");
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(b"\"\r\n\r\n");
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--XYZ--\r\n");
    body
}

const MULTIPART: &str = "multipart/form-data; boundary=XYZ";

/// A raw HTTP/1.1 POST to /orders with these extra header lines and body bytes.
fn raw_post(headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut req = b"POST /orders HTTP/1.1\r\nHost: test\r\nConnection: close\r\n".to_vec();
    for h in headers {
        req.extend_from_slice(h.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    req
}

fn rows() -> Vec<Row> {
    use Expect::*;
    let client = Send::Client;
    let invalid = || Problem(400, "key-invalid");
    let conflict = || Problem(400, "key-conflict");
    vec![
        // ---- over-long keys (256 characters; 255 is the most)
        row(
            "over-long key, sf-string Idempotency-Key",
            client(|c, u| {
                c.post(u)
                    .header("Idempotency-Key", format!("\"{}\"", long_key()))
                    .body("x")
            }),
            invalid(),
        ),
        row(
            "over-long key, bare Idempotency-Key",
            client(|c, u| c.post(u).header("Idempotency-Key", long_key()).body("x")),
            invalid(),
        ),
        row(
            "over-long key, X-Idempotent-Key",
            client(|c, u| c.post(u).header("X-Idempotent-Key", long_key()).body("x")),
            invalid(),
        ),
        row(
            "over-long key, query parameter",
            client(|c, u| {
                c.post(format!("{u}?__idempotent_key={}", long_key()))
                    .body("x")
            }),
            invalid(),
        ),
        row(
            "over-long key, urlencoded form field",
            client(|c, u| c.post(u).form(&[("__idempotent_key", long_key())])),
            invalid(),
        ),
        row(
            "over-long key, multipart form field",
            client(|c, u| {
                c.post(u)
                    .header("content-type", MULTIPART)
                    .body(multipart(&[("__idempotent_key", long_key().as_bytes())]))
            }),
            invalid(),
        ),
        row(
            "over-long key, a 64 KiB header",
            client(|c, u| {
                c.post(u)
                    .header("Idempotency-Key", "k".repeat(64 * 1024))
                    .body("x")
            }),
            invalid(),
        ),
        // ---- non-ASCII keys
        row(
            "non-ASCII key, raw Latin-1 byte in Idempotency-Key",
            client(|c, u| {
                c.post(u)
                    .header(
                        "Idempotency-Key",
                        HeaderValue::from_bytes(b"caf\xe9").unwrap(),
                    )
                    .body("x")
            }),
            invalid(),
        ),
        row(
            "non-ASCII key, UTF-8 inside an sf-string",
            client(|c, u| {
                c.post(u)
                    .header(
                        "Idempotency-Key",
                        HeaderValue::from_bytes("\"café\"".as_bytes()).unwrap(),
                    )
                    .body("x")
            }),
            invalid(),
        ),
        row(
            "non-ASCII key, UTF-8 in X-Idempotent-Key",
            client(|c, u| {
                c.post(u)
                    .header(
                        "X-Idempotent-Key",
                        HeaderValue::from_bytes("ключ".as_bytes()).unwrap(),
                    )
                    .body("x")
            }),
            invalid(),
        ),
        row(
            "non-ASCII key, percent-encoded UTF-8 in the query",
            client(|c, u| c.post(format!("{u}?__idempotent_key=caf%C3%A9")).body("x")),
            invalid(),
        ),
        row(
            "non-ASCII key, percent-encoded invalid UTF-8 in the query",
            client(|c, u| c.post(format!("{u}?__idempotent_key=k%FF%FE")).body("x")),
            invalid(),
        ),
        row(
            "non-ASCII key, urlencoded form field",
            client(|c, u| c.post(u).form(&[("__idempotent_key", "clé")])),
            invalid(),
        ),
        row(
            "non-ASCII key, multipart form field",
            client(|c, u| {
                c.post(u)
                    .header("content-type", MULTIPART)
                    .body(multipart(&[("__idempotent_key", "clé".as_bytes())]))
            }),
            invalid(),
        ),
        row(
            "non-UTF-8 key, multipart form field",
            client(|c, u| {
                c.post(u)
                    .header("content-type", MULTIPART)
                    .body(multipart(&[("__idempotent_key", b"k\xff\xfe")]))
            }),
            invalid(),
        ),
        // ---- control characters (and the space, which is no visible character either)
        row(
            "control character, tab inside a bare Idempotency-Key",
            client(|c, u| c.post(u).header("Idempotency-Key", "a\tb").body("x")),
            invalid(),
        ),
        row(
            "control character, tab inside X-Idempotent-Key",
            client(|c, u| c.post(u).header("X-Idempotent-Key", "a\tb").body("x")),
            invalid(),
        ),
        row(
            "space inside an sf-string key",
            client(|c, u| c.post(u).header("Idempotency-Key", "\"a b\"").body("x")),
            invalid(),
        ),
        row(
            "control character, %01 in the query",
            client(|c, u| c.post(format!("{u}?__idempotent_key=a%01b")).body("x")),
            invalid(),
        ),
        row(
            "control character, %00 in the query",
            client(|c, u| c.post(format!("{u}?__idempotent_key=a%00b")).body("x")),
            invalid(),
        ),
        row(
            "control character, DEL (%7F) in the query",
            client(|c, u| c.post(format!("{u}?__idempotent_key=a%7Fb")).body("x")),
            invalid(),
        ),
        row(
            "control character, newline in a urlencoded form field",
            client(|c, u| c.post(u).form(&[("__idempotent_key", "a\nb")])),
            invalid(),
        ),
        row(
            "control character, escape in a multipart form field",
            client(|c, u| {
                c.post(u)
                    .header("content-type", MULTIPART)
                    .body(multipart(&[("__idempotent_key", b"a\x1bb")]))
            }),
            invalid(),
        ),
        row(
            "control character, raw 0x01 in an Idempotency-Key header line",
            Send::Raw {
                bytes: raw_post(&["Idempotency-Key: a\x01b", "Content-Length: 1"], b"x"),
                then: Then::HalfClose,
            },
            ServerRefusal(400),
        ),
        // ---- empty keys
        row(
            "empty key, sf-string \"\"",
            client(|c, u| c.post(u).header("Idempotency-Key", "\"\"").body("x")),
            invalid(),
        ),
        row(
            "empty key, empty Idempotency-Key",
            client(|c, u| c.post(u).header("Idempotency-Key", "").body("x")),
            invalid(),
        ),
        row(
            "empty key, whitespace-only Idempotency-Key",
            Send::Raw {
                bytes: raw_post(&["Idempotency-Key: \t ", "Content-Length: 1"], b"x"),
                then: Then::HalfClose,
            },
            invalid(),
        ),
        row(
            "empty key, empty X-Idempotent-Key",
            client(|c, u| c.post(u).header("X-Idempotent-Key", "").body("x")),
            invalid(),
        ),
        row(
            "empty key, query parameter",
            client(|c, u| c.post(format!("{u}?__idempotent_key=")).body("x")),
            invalid(),
        ),
        row(
            "empty key, query parameter without a value",
            client(|c, u| c.post(format!("{u}?__idempotent_key")).body("x")),
            invalid(),
        ),
        row(
            "empty key, urlencoded form field",
            client(|c, u| {
                c.post(u)
                    .form(&[("__idempotent_key", ""), ("item", "book")])
            }),
            invalid(),
        ),
        row(
            "empty key, multipart form field",
            client(|c, u| {
                c.post(u)
                    .header("content-type", MULTIPART)
                    .body(multipart(&[("__idempotent_key", b"")]))
            }),
            invalid(),
        ),
        // ---- two sources naming different keys (an `Idempotency-Key` that disagrees with a
        // key the page chose is ignored instead: see tests/browser_keys.rs)
        row(
            "two sources, X-Idempotent-Key and the query",
            client(|c, u| {
                c.post(format!("{u}?__idempotent_key=b"))
                    .header("X-Idempotent-Key", "a")
                    .body("x")
            }),
            conflict(),
        ),
        row(
            "two sources, X-Idempotent-Key and the query, beside an Idempotency-Key",
            client(|c, u| {
                c.post(format!("{u}?__idempotent_key=b"))
                    .header("Idempotency-Key", "\"b\"")
                    .header("X-Idempotent-Key", "a")
                    .body("x")
            }),
            conflict(),
        ),
        row(
            "two sources, X-Idempotent-Key and a urlencoded form",
            client(|c, u| {
                c.post(u)
                    .header("X-Idempotent-Key", "a")
                    .form(&[("__idempotent_key", "b")])
            }),
            conflict(),
        ),
        row(
            "two sources, the query and a multipart form",
            client(|c, u| {
                c.post(format!("{u}?__idempotent_key=a"))
                    .header("content-type", MULTIPART)
                    .body(multipart(&[("__idempotent_key", b"b")]))
            }),
            conflict(),
        ),
        row(
            "two sources, the query parameter twice with different keys",
            client(|c, u| {
                c.post(format!("{u}?__idempotent_key=a&__idempotent_key=b"))
                    .body("x")
            }),
            conflict(),
        ),
        row(
            "two sources, two urlencoded form fields with different keys",
            client(|c, u| {
                c.post(u)
                    .form(&[("__idempotent_key", "a"), ("__idempotent_key", "b")])
            }),
            conflict(),
        ),
        row(
            "two sources, two multipart fields with different keys",
            client(|c, u| {
                c.post(u)
                    .header("content-type", MULTIPART)
                    .body(multipart(&[
                        ("__idempotent_key", b"a"),
                        ("__idempotent_key", b"b"),
                    ]))
            }),
            conflict(),
        ),
        // ---- repeated headers
        row(
            "repeated Idempotency-Key header, the same key twice",
            client(|c, u| {
                c.post(u)
                    .header("Idempotency-Key", "\"dup\"")
                    .header("Idempotency-Key", "\"dup\"")
                    .body("x")
            }),
            conflict(),
        ),
        row(
            "repeated Idempotency-Key header, two keys",
            client(|c, u| {
                c.post(u)
                    .header("Idempotency-Key", "\"one\"")
                    .header("Idempotency-Key", "\"two\"")
                    .body("x")
            }),
            conflict(),
        ),
        row(
            "repeated Idempotency-Key header beside a page key",
            client(|c, u| {
                c.post(format!("{u}?__idempotent_key=page"))
                    .header("Idempotency-Key", "\"one\"")
                    .header("Idempotency-Key", "\"one\"")
                    .body("x")
            }),
            conflict(),
        ),
        row(
            "repeated X-Idempotent-Key header",
            client(|c, u| {
                c.post(u)
                    .header("X-Idempotent-Key", "one")
                    .header("X-Idempotent-Key", "one")
                    .body("x")
            }),
            conflict(),
        ),
        row(
            "repeated Idempotency-Key as a list in one header line",
            client(|c, u| {
                c.post(u)
                    .header("Idempotency-Key", "\"one\", \"two\"")
                    .body("x")
            }),
            invalid(),
        ),
        // ---- malformed multipart, tracked through a key in a header
        row(
            "malformed multipart, garbage body",
            client(|c, u| {
                c.post(u)
                    .header("Idempotency-Key", "\"mp-1\"")
                    .header("content-type", MULTIPART)
                    .body("this is no multipart body")
            }),
            Problem(400, "form-malformed"),
        ),
        row(
            "malformed multipart, no closing boundary",
            client(|c, u| {
                c.post(u)
                    .header("Idempotency-Key", "\"mp-2\"")
                    .header("content-type", MULTIPART)
                    .body("--XYZ\r\nContent-Disposition: form-data; name=\"item\"\r\n\r\nbook")
            }),
            Problem(400, "form-malformed"),
        ),
        row(
            "malformed multipart, a part without headers",
            client(|c, u| {
                c.post(u)
                    .header("X-Idempotent-Key", "mp-3")
                    .header("content-type", MULTIPART)
                    .body("--XYZ\r\nno header line here\r\n--XYZ--\r\n")
            }),
            Problem(400, "form-malformed"),
        ),
        row(
            "malformed multipart, the key field before the damage",
            client(|c, u| {
                c.post(u)
                    .header("content-type", MULTIPART)
                    .body("--XYZ\r\nContent-Disposition: form-data; name=\"__idempotent_key\"\r\n\r\nmp-4\r\n--XYZ\r\nbroken")
            }),
            Problem(400, "form-malformed"),
        ),
        row(
            "multipart without a boundary, key in a header",
            client(|c, u| {
                c.post(u)
                    .header("Idempotency-Key", "\"mp-5\"")
                    .header("content-type", "multipart/form-data")
                    .body("--XYZ\r\nContent-Disposition: form-data; name=\"item\"\r\n\r\nbook\r\n--XYZ--\r\n")
            }),
            Problem(400, "form-malformed"),
        ),
        row(
            "multipart with an empty boundary, key in a header",
            client(|c, u| {
                c.post(u)
                    .header("X-Idempotent-Key", "mp-6")
                    .header("content-type", "multipart/form-data; boundary=")
                    .body("item=book")
            }),
            Problem(400, "form-malformed"),
        ),
        // ---- truncated bodies: Content-Length larger than what is sent
        row(
            "truncated body, then the client half-closes and reads",
            Send::Raw {
                bytes: raw_post(
                    &["Idempotency-Key: \"cut-1\"", "Content-Length: 100"],
                    b"only ten..",
                ),
                then: Then::HalfClose,
            },
            Problem(400, "body-unreadable"),
        ),
        row(
            "truncated body, then the client closes",
            Send::Raw {
                bytes: raw_post(
                    &["Idempotency-Key: \"cut-2\"", "Content-Length: 100"],
                    b"only ten..",
                ),
                then: Then::Close,
            },
            ClientGone,
        ),
        row(
            "truncated chunked body, then the client half-closes and reads",
            Send::Raw {
                bytes: raw_post(
                    &["Idempotency-Key: \"cut-3h\"", "Transfer-Encoding: chunked"],
                    b"a\r\nonly ten..\r\n",
                ),
                then: Then::HalfClose,
            },
            Problem(400, "body-unreadable"),
        ),
        row(
            "truncated urlencoded form carrying the key, then the client half-closes and reads",
            Send::Raw {
                bytes: raw_post(
                    &[
                        "Content-Type: application/x-www-form-urlencoded",
                        "Content-Length: 100",
                    ],
                    b"__idempotent_key=cut-4h&item=bo",
                ),
                then: Then::HalfClose,
            },
            Problem(400, "body-unreadable"),
        ),
        row(
            "truncated chunked body, then the client closes",
            Send::Raw {
                bytes: raw_post(
                    &["Idempotency-Key: \"cut-3\"", "Transfer-Encoding: chunked"],
                    b"a\r\nonly ten..\r\n",
                ),
                then: Then::Close,
            },
            ClientGone,
        ),
        row(
            "truncated urlencoded form carrying the key, then the client closes",
            Send::Raw {
                bytes: raw_post(
                    &[
                        "Content-Type: application/x-www-form-urlencoded",
                        "Content-Length: 100",
                    ],
                    b"__idempotent_key=cut-4&item=bo",
                ),
                then: Then::Close,
            },
            ClientGone,
        ),
        row(
            "a chunked body with a bad chunk size",
            Send::Raw {
                bytes: raw_post(
                    &["Idempotency-Key: \"cut-5\"", "Transfer-Encoding: chunked"],
                    b"zz\r\nnot a chunk\r\n0\r\n\r\n",
                ),
                then: Then::HalfClose,
            },
            Problem(400, "body-unreadable"),
        ),
        // ---- absurd Content-Length
        row(
            "absurd Content-Length, 99999999999999999999 (past u64)",
            Send::Raw {
                bytes: raw_post(
                    &[
                        "Idempotency-Key: \"cl-1\"",
                        "Content-Length: 99999999999999999999",
                    ],
                    b"x",
                ),
                then: Then::HalfClose,
            },
            ServerRefusal(400),
        ),
        row(
            "absurd Content-Length, negative",
            Send::Raw {
                bytes: raw_post(&["Idempotency-Key: \"cl-2\"", "Content-Length: -1"], b"x"),
                then: Then::HalfClose,
            },
            ServerRefusal(400),
        ),
        row(
            "absurd Content-Length, two different values",
            Send::Raw {
                bytes: raw_post(
                    &[
                        "Idempotency-Key: \"cl-3\"",
                        "Content-Length: 1",
                        "Content-Length: 2",
                    ],
                    b"xx",
                ),
                then: Then::HalfClose,
            },
            ServerRefusal(400),
        ),
        row(
            "absurd Content-Length, u64::MAX (hyper: too large to frame)",
            Send::Raw {
                bytes: raw_post(
                    &[
                        "Idempotency-Key: \"cl-4\"",
                        "Content-Length: 18446744073709551615",
                    ],
                    b"",
                ),
                then: Then::HalfClose,
            },
            ServerRefusal(431),
        ),
        row(
            "absurd Content-Length, the largest hyper frames, nothing sent",
            Send::Raw {
                bytes: raw_post(
                    &[
                        "Idempotency-Key: \"cl-4b\"",
                        "Content-Length: 18446744073709551613",
                    ],
                    b"",
                ),
                then: Then::HalfClose,
            },
            Problem(413, "request-too-large"),
        ),
        row(
            "Content-Length one byte over max_request_body, nothing sent",
            Send::Raw {
                bytes: raw_post(
                    &[
                        "Idempotency-Key: \"cl-5\"",
                        &format!("Content-Length: {}", LIMIT + 1),
                    ],
                    b"",
                ),
                then: Then::HalfClose,
            },
            Problem(413, "request-too-large"),
        ),
        row(
            "a body over max_request_body, sent in full",
            client(|c, u| {
                c.post(u)
                    .header("Idempotency-Key", "\"cl-6\"")
                    .body(vec![b'x'; LIMIT + 1])
            }),
            Problem(413, "request-too-large"),
        ),
        row(
            "a chunked body over max_request_body, without a Content-Length",
            client(|c, u| {
                let chunks = (0..5).map(|_| Ok::<_, std::io::Error>(vec![b'x'; LIMIT / 4]));
                c.post(u)
                    .header("Idempotency-Key", "\"cl-7\"")
                    .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                        chunks,
                    )))
            }),
            Problem(413, "request-too-large"),
        ),
    ]
}

/// What came back over raw TCP: the status, whether the body was problem+json, the body.
struct RawReply {
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// Sends `bytes` over a fresh connection; with `HalfClose`, shuts the writing side and reads the
/// answer until the server closes (None when it closed without one).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8], then: Then) -> Option<RawReply> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    if then == Then::Close {
        drop(stream);
        return None;
    }
    stream.shutdown().await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the server neither answered nor closed in 10 s"
    );
    if out.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let content_type = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-type")
            .then(|| value.trim().to_owned())
    });
    Some(RawReply {
        status,
        content_type,
        body: body.as_bytes().to_vec(),
    })
}

fn as_reply(raw: &RawReply) -> Reply {
    let mut headers = http::HeaderMap::new();
    if let Some(ct) = &raw.content_type {
        headers.insert("content-type", HeaderValue::from_str(ct).unwrap());
    }
    Reply {
        status: StatusCode::from_u16(raw.status).unwrap(),
        headers,
        body: raw.body.clone().into(),
    }
}

/// Runs one row against a server and store of its own, and checks everything it promises.
async fn check(row: Row) {
    let name = row.name;
    let store = RecordingStore::default();
    let (app, count) = harness::counting_app(layer(&store));
    let srv: TestServer = serve(app).await;
    let c = client();
    let url = srv.url("/orders");

    match (row.send, &row.expect) {
        (Send::Client(build), Expect::Problem(status, slug)) => {
            let reply = send(build(&c, &url)).await;
            assert_eq!(reply.status.as_u16(), *status, "{name}: {}", reply.text());
            assert_problem(&reply, *status, slug);
        }
        (Send::Raw { bytes, then }, expect) => {
            let answer = raw_exchange(srv.addr, &bytes, then).await;
            match (expect, answer) {
                (Expect::Problem(status, slug), Some(raw)) => {
                    assert_eq!(
                        raw.status,
                        *status,
                        "{name}: {}",
                        String::from_utf8_lossy(&raw.body)
                    );
                    assert_problem(&as_reply(&raw), *status, slug);
                }
                (Expect::ServerRefusal(status), Some(raw)) => {
                    assert_eq!(
                        raw.status, *status,
                        "{name}: the server refuses the framing"
                    );
                }
                (Expect::ClientGone, None) => {}
                (_, None) => panic!("{name}: the server closed without an answer"),
                (Expect::ClientGone, Some(_)) => {
                    unreachable!("{name}: a closed client reads nothing")
                }
            }
        }
        (Send::Client(_), _) => unreachable!("{name}: client rows expect a problem"),
    }

    // Let the server finish whatever the connection left behind (a closed client's request).
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(count.get(), 0, "{name}: the handler never ran");
    assert_eq!(store.len(), 0, "{name}: no record or lease left behind");
    assert_eq!(
        store.total_calls(),
        0,
        "{name}: the store was never asked ({:?})",
        store.calls()
    );

    // The server keeps serving, and the store does record a good request: the checks above
    // would have seen one.
    let ok = send(c.post(&url).header("Idempotency-Key", "\"good\"").body("x")).await;
    assert_eq!(
        ok.status,
        StatusCode::CREATED,
        "{name}: a good request afterwards"
    );
    assert_eq!(count.get(), 1, "{name}: the good request ran");
    assert_eq!(store.len(), 1, "{name}: the good request left its record");
}

#[tokio::test]
async fn every_bad_input_is_refused_with_its_problem_and_leaves_no_record() {
    let rows = rows();
    assert!(rows.len() >= 40, "the table lost rows");
    for row in rows {
        check(row).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Invalid Prefer: the preference is ignored and the request served normally.

const BAD_PREFERS: [&str; 8] = [
    "wait=abc",
    "wait=-1",
    "wait=99999999999999999999",
    "wait=",
    "wait=1.5",
    "wait=\"5",
    "wait",
    "wait=0x10",
];

#[tokio::test]
async fn invalid_prefer_wait_is_ignored_and_the_request_served() {
    for prefer in BAD_PREFERS {
        let name = format!("Prefer: {prefer}");
        let store = RecordingStore::default();
        let (app, count) = harness::counting_app(layer(&store));
        let srv = serve(app).await;
        let c = client();
        let post = || {
            c.post(srv.url("/orders"))
                .header("Idempotency-Key", "\"p\"")
                .header("Prefer", prefer)
                .body("x")
        };
        let first = send(post()).await;
        assert_eq!(
            first.status,
            StatusCode::CREATED,
            "{name}: {}",
            first.text()
        );
        assert!(!first.replayed(), "{name}");
        let again = send(post()).await;
        assert!(again.replayed(), "{name}: the duplicate replays");
        assert_eq!(again.body, first.body, "{name}");
        assert_eq!(count.get(), 1, "{name}: ran once");
        assert_eq!(store.len(), 1, "{name}: one record");
    }
}

/// An ignored preference means the configured wait: a duplicate of a request in flight waits
/// for it and replays, where `Prefer: wait=0` would have been a 409 at once.
#[tokio::test]
async fn invalid_prefer_wait_keeps_the_configured_wait() {
    for prefer in BAD_PREFERS
        .iter()
        .chain(["wait=18446744073709551615"].iter())
    {
        let name = format!("Prefer: {prefer}");
        let store = RecordingStore::default();
        let gate = Gate::default();
        let (app, count): (_, Counter) = harness::gated_app(layer(&store), gate.clone());
        let srv = serve(app).await;
        let c = client();
        let post = || {
            c.post(srv.url("/slow"))
                .header("Idempotency-Key", "\"w\"")
                .header("Prefer", *prefer)
        };
        let first = tokio::spawn(send(post()));
        count.reached(1).await;
        let dup = tokio::spawn(send(post()));
        // The duplicate is waiting once it asked the store to wait.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.count("wait") == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: the duplicate never waited"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gate.open();
        let first = first.await.unwrap();
        let dup = dup.await.unwrap();
        assert_eq!(first.status, StatusCode::CREATED, "{name}");
        assert!(
            dup.replayed(),
            "{name}: the duplicate waited and replayed: {}",
            dup.text()
        );
        assert_eq!(dup.body, first.body, "{name}");
        assert_eq!(count.get(), 1, "{name}: ran once");
    }
}

/// For contrast: a valid `Prefer: wait=0` is honoured (a 409 at once), so the test above would
/// notice a bad value taken as zero.
#[tokio::test]
async fn valid_prefer_wait_zero_is_honoured() {
    let store = RecordingStore::default();
    let gate = Gate::default();
    let (app, count) = harness::gated_app(layer(&store), gate.clone());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/slow")).header("Idempotency-Key", "\"z\"");
    let first = tokio::spawn(send(post()));
    count.reached(1).await;
    let dup = send(post().header("Prefer", "wait=0")).await;
    assert_problem(&dup, 409, "request-in-flight");
    gate.open();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
}
