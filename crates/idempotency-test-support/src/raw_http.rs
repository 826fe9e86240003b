//! Raw HTTP/1.1 over TCP, for what a well-behaved client cannot send: trickled bodies, bodies
//! cut short, request targets a client would normalise. Shared by the library's and the
//! proxy's tests.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A raw HTTP/1.1 answer: its status, headers (names lowercased) and body.
#[derive(Debug)]
pub struct RawAnswer {
    /// The status code.
    pub status: u16,
    /// The headers, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
}

impl RawAnswer {
    /// The first value of a header (lowercase name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The problem document's `type`, checked to be `application/problem+json` with a
    /// matching `status`.
    pub fn problem_type(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        let doc: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        assert_eq!(doc["status"], self.status, "{doc}");
        doc["type"].as_str().unwrap().to_owned()
    }

    /// The last part of the problem document's `type`, checked as [`Self::problem_type`] is.
    pub fn problem_slug(&self) -> String {
        let ty = self.problem_type();
        ty.rsplit(':').next().unwrap().to_owned()
    }
}

/// Parses an HTTP/1.1 answer once it is complete (its head and a `Content-Length` body).
pub fn parse_answer(buf: &[u8]) -> Option<RawAnswer> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let body = buf.get(end + 4..end + 4 + length)?.to_vec();
    Some(RawAnswer {
        status,
        headers,
        body,
    })
}

/// Sends `bytes` over a new TCP connection, then nothing more (`trickle: None`), or one more
/// byte `x` per `trickle` pause, until the server answers. Returns the answer.
pub async fn raw_request(addr: SocketAddr, bytes: &[u8], trickle: Option<Duration>) -> RawAnswer {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    read_answer(&mut stream, trickle).await
}

/// Reads one answer from `stream`, writing a byte `x` per `trickle` pause meanwhile.
pub async fn read_answer(
    stream: &mut tokio::net::TcpStream,
    trickle: Option<Duration>,
) -> RawAnswer {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let answer = async {
        loop {
            let pause = trickle.unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                read = stream.read(&mut chunk) => {
                    let n = read.unwrap_or(0);
                    assert!(n > 0, "closed without a complete answer: {:?}", String::from_utf8_lossy(&buf));
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(answer) = parse_answer(&buf) {
                        return answer;
                    }
                }
                () = tokio::time::sleep(pause) => {
                    // The server may have stopped reading; its answer says what it did.
                    let _ = stream.write_all(b"x").await;
                }
            }
        }
    };
    // Only keeps a broken build from hanging the suite.
    tokio::time::timeout(Duration::from_secs(30), answer)
        .await
        .expect("no answer in 30 s")
}
