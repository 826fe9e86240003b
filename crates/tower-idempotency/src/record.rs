//! The stored response and its versioned binary codec.
//!
//! Public only for this workspace's benchmarks, which fill stores with records directly. Not a
//! stable API: it may change in any release.
//!
//! The format is ours, small and explicit (no serializer that could run code on decode, unlike
//! Flask-Idempotent's pickle):
//!
//! ```text
//! version u8 (= 1) | flags u8 (bit 0: replayable, bit 1: outcome unknown) | fingerprint [32]
//! status u16 | header count u16 | { name len u16, name, value len u32, value }*
//! body len u32 | body
//! ```
//! All integers are big-endian. A decoder refuses unknown versions, truncated input and
//! trailing bytes.
//!
//! The widths bound what a record holds: [`MAX_HEADERS`] headers, header names of
//! [`MAX_HEADER_NAME_LEN`] bytes and values of [`MAX_HEADER_VALUE_LEN`], a body of
//! [`MAX_BODY_LEN`]. A response past any bound is never cut to fit: [`Record::try_encode`]
//! refuses it, and the layer stores it as not replayable instead ([`Unreplayable::TooLarge`],
//! counted as [`Event::Unstorable`](crate::Event::Unstorable)), so duplicates get 409
//! and nothing runs twice. [`IdempotencyLayer::with_max_response_body`] holds its limit to
//! [`MAX_BODY_LEN`].
//!
//! [`IdempotencyLayer::with_max_response_body`]: crate::IdempotencyLayer::with_max_response_body

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::fingerprint::Fingerprint;

const VERSION: u8 = 1;

/// The most headers a record holds (the count is 16 bits).
pub const MAX_HEADERS: usize = u16::MAX as usize;
/// The longest header name a record holds, in bytes (its length is 16 bits).
pub const MAX_HEADER_NAME_LEN: usize = u16::MAX as usize;
/// The longest header value a record holds, in bytes (its length is 32 bits).
pub const MAX_HEADER_VALUE_LEN: usize = u32::MAX as usize;
/// The longest body a record holds, in bytes (its length is 32 bits): 4 GiB less one byte.
pub const MAX_BODY_LEN: usize = u32::MAX as usize;
const FLAG_REPLAYABLE: u8 = 1;
/// Set on a record that is not replayable because the request's outcome is unknown. A decoder
/// that predates it reads such a record as too large to replay: never as a reason to run again.
const FLAG_OUTCOME_UNKNOWN: u8 = 2;

/// A completed request as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The fingerprint of the request that produced it.
    pub fingerprint: Fingerprint,
    /// The response, or why there is none to replay. Either way the handler does not run again
    /// for this key while the record lives: duplicates get an error instead of a replay.
    pub response: Result<StoredResponse, Unreplayable>,
}

/// Why a completed record holds no response to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreplayable {
    /// The response was larger than the replay limit. It reached its caller in full.
    TooLarge,
    /// The request may have run, but its outcome is unknown: the inner service said so
    /// ([`OutcomeUnknown`](crate::OutcomeUnknown)), or the response body failed after its status
    /// was sent.
    OutcomeUnknown,
}

/// A response kept for replay.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    /// The status code.
    pub status: StatusCode,
    /// The stored headers, repeated values and non-UTF-8 bytes kept as they were.
    pub headers: HeaderMap,
    /// The body, byte for byte.
    pub body: Bytes,
}

/// Why a stored record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(&'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad record: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// Why a response cannot be written in a record: it is past one of the format's bounds
/// ([`MAX_HEADERS`], [`MAX_HEADER_NAME_LEN`], [`MAX_HEADER_VALUE_LEN`], [`MAX_BODY_LEN`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeError(&'static str);

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "response cannot be stored: {}", self.0)
    }
}

impl std::error::Error for EncodeError {}

impl Record {
    /// Encodes the record, or says which bound of the format its response is past.
    pub fn try_encode(&self) -> Result<Bytes, EncodeError> {
        encode(
            &self.fingerprint,
            self.response
                .as_ref()
                .map(|r| (r.status, &r.headers, &r.body[..]))
                .map_err(|why| *why),
            |_| true,
        )
    }

    /// Encodes the record. A response past a bound of the format (see [`Record::try_encode`])
    /// is written as not replayable ([`Unreplayable::TooLarge`]), never cut to fit.
    pub fn encode(&self) -> Bytes {
        self.try_encode()
            .unwrap_or_else(|_| not_replayable(&self.fingerprint, Unreplayable::TooLarge))
    }

    /// Decodes a record written by [`Record::encode`].
    pub fn decode(mut buf: Bytes) -> Result<Self, DecodeError> {
        fn need(buf: &Bytes, n: usize) -> Result<(), DecodeError> {
            if buf.remaining() < n {
                Err(DecodeError("truncated"))
            } else {
                Ok(())
            }
        }
        need(&buf, 2 + 32 + 4)?;
        if buf.get_u8() != VERSION {
            return Err(DecodeError("unknown version"));
        }
        let flags = buf.get_u8();
        let mut fp = [0u8; 32];
        buf.copy_to_slice(&mut fp);
        let status = buf.get_u16();
        let count = buf.get_u16();
        // The count is untrusted: reserve no more than the bytes left can back (each header
        // takes at least 7) and a modest amount at most (`with_capacity` panics past what a
        // HeaderMap holds); the map grows past that if the headers are really there. One more
        // place for the header a replay adds, so that adding it does not grow the map.
        let mut headers =
            HeaderMap::with_capacity((count as usize).min(buf.remaining() / 7).min(256) + 1);
        for _ in 0..count {
            need(&buf, 2)?;
            let n = buf.get_u16() as usize;
            need(&buf, n)?;
            let name = HeaderName::from_bytes(&buf.split_to(n))
                .map_err(|_| DecodeError("bad header name"))?;
            need(&buf, 4)?;
            let n = buf.get_u32() as usize;
            need(&buf, n)?;
            let value = HeaderValue::from_maybe_shared(buf.split_to(n))
                .map_err(|_| DecodeError("bad header value"))?;
            headers
                .try_append(name, value)
                .map_err(|_| DecodeError("too many headers"))?;
        }
        need(&buf, 4)?;
        let n = buf.get_u32() as usize;
        need(&buf, n)?;
        let body = buf.split_to(n);
        if buf.has_remaining() {
            return Err(DecodeError("trailing bytes"));
        }
        let response = if flags & FLAG_REPLAYABLE != 0 {
            Ok(StoredResponse {
                status: StatusCode::from_u16(status).map_err(|_| DecodeError("bad status"))?,
                headers,
                body,
            })
        } else if flags & FLAG_OUTCOME_UNKNOWN != 0 {
            Err(Unreplayable::OutcomeUnknown)
        } else {
            Err(Unreplayable::TooLarge)
        };
        Ok(Record {
            fingerprint: Fingerprint(fp),
            response,
        })
    }
}

/// The bytes of a record without a response to replay, which always fit.
fn not_replayable(fingerprint: &Fingerprint, why: Unreplayable) -> Bytes {
    let mut out = BytesMut::with_capacity(2 + 32 + 8);
    out.put_u8(VERSION);
    out.put_u8(flags(Err(why)));
    out.put_slice(&fingerprint.0);
    out.put_u16(0);
    out.put_u16(0);
    out.put_u32(0);
    out.freeze()
}

fn flags(response: Result<(), Unreplayable>) -> u8 {
    match response {
        Ok(()) => FLAG_REPLAYABLE,
        Err(Unreplayable::TooLarge) => 0,
        Err(Unreplayable::OutcomeUnknown) => FLAG_OUTCOME_UNKNOWN,
    }
}

/// Encodes a record from borrowed parts, keeping the headers `keep` accepts, so a response's
/// headers are filtered as they are written, without a copy of the map. With every header kept,
/// the bytes are those of [`Record::try_encode`]. A response past a bound of the format is
/// refused whole, never written in part.
pub(crate) fn encode(
    fingerprint: &Fingerprint,
    response: Result<(StatusCode, &HeaderMap, &[u8]), Unreplayable>,
    keep: impl Fn(&HeaderName) -> bool,
) -> Result<Bytes, EncodeError> {
    let (status, headers, body) = match response {
        Ok(parts) => parts,
        Err(why) => return Ok(not_replayable(fingerprint, why)),
    };
    // Every bound is checked before a byte is written.
    let mut count = 0usize;
    let mut size = 2 + 32 + 4 + 4 + body.len();
    for (name, value) in headers.iter().filter(|(n, _)| keep(n)) {
        count += 1;
        if name.as_str().len() > MAX_HEADER_NAME_LEN {
            return Err(EncodeError("a header name is longer than 65535 bytes"));
        }
        if value.len() > MAX_HEADER_VALUE_LEN {
            return Err(EncodeError("a header value is longer than 4 GiB"));
        }
        size += 6 + name.as_str().len() + value.len();
    }
    if count > MAX_HEADERS {
        return Err(EncodeError("more than 65535 headers"));
    }
    if body.len() > MAX_BODY_LEN {
        return Err(EncodeError("the body is longer than 4 GiB"));
    }
    let mut out = BytesMut::with_capacity(size);
    out.put_u8(VERSION);
    out.put_u8(flags(Ok(())));
    out.put_slice(&fingerprint.0);
    out.put_u16(status.as_u16());
    out.put_u16(count as u16);
    for (name, value) in headers.iter().filter(|(n, _)| keep(n)) {
        out.put_u16(name.as_str().len() as u16);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
    out.put_u32(body.len() as u32);
    out.put_slice(body);
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_bytes_and_repeats() {
        let mut headers = HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.append(
            "x-bin",
            HeaderValue::from_bytes(&[0xff, 0xfe, b'a']).unwrap(),
        );
        let rec = Record {
            fingerprint: Fingerprint([3; 32]),
            response: Ok(StoredResponse {
                status: StatusCode::CREATED,
                headers,
                body: Bytes::from_static(&[0, 1, 2, 255]),
            }),
        };
        let back = Record::decode(rec.encode()).unwrap();
        assert_eq!(back, rec);
        let vals: Vec<_> = back
            .response
            .unwrap()
            .headers
            .get_all("x-a")
            .iter()
            .cloned()
            .collect();
        assert_eq!(vals, ["1", "2"]);
    }

    #[test]
    fn not_replayable_round_trips() {
        for why in [Unreplayable::TooLarge, Unreplayable::OutcomeUnknown] {
            let rec = Record {
                fingerprint: Fingerprint([1; 32]),
                response: Err(why),
            };
            assert_eq!(Record::decode(rec.encode()).unwrap(), rec);
        }
    }

    #[test]
    fn absurd_header_count_is_refused_not_a_panic() {
        // Found by the record_decode fuzz target: a count of 65535 made `with_capacity` panic.
        let mut bytes = vec![VERSION, FLAG_REPLAYABLE];
        bytes.extend_from_slice(&[0; 32]);
        bytes.extend_from_slice(&200u16.to_be_bytes());
        bytes.extend_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            Record::decode(Bytes::from(bytes.clone())),
            Err(DecodeError("truncated"))
        );
        // The same count with the bytes to back it: 65535 headers of one name decode.
        for _ in 0..u16::MAX {
            bytes.extend_from_slice(&1u16.to_be_bytes());
            bytes.push(b'a');
            bytes.extend_from_slice(&0u32.to_be_bytes());
        }
        bytes.extend_from_slice(&0u32.to_be_bytes());
        let rec = Record::decode(Bytes::from(bytes)).expect("65535 repeats of one header");
        let headers = &rec.response.expect("replayable").headers;
        assert_eq!(headers.len(), u16::MAX as usize);
    }

    #[test]
    fn more_headers_than_the_format_holds_are_refused_not_cut() {
        let mut headers = HeaderMap::new();
        for _ in 0..MAX_HEADERS {
            headers.append("x-many", HeaderValue::from_static("1"));
        }
        headers.append("x-other", HeaderValue::from_static("2"));
        let mut rec = Record {
            fingerprint: Fingerprint([5; 32]),
            response: Ok(StoredResponse {
                status: StatusCode::OK,
                headers,
                body: Bytes::from_static(b"b"),
            }),
        };
        assert_eq!(
            rec.try_encode(),
            Err(EncodeError("more than 65535 headers"))
        );
        // `encode` writes it as not replayable, never as a response with headers missing.
        let back = Record::decode(rec.encode()).unwrap();
        assert_eq!(back.fingerprint, rec.fingerprint);
        assert_eq!(back.response, Err(Unreplayable::TooLarge));
        // The filter counts: the same response without one header fits, all of it.
        if let Ok(response) = &mut rec.response {
            response.headers.remove("x-other");
        }
        let back = Record::decode(rec.try_encode().unwrap()).unwrap();
        assert_eq!(back, rec);
        let Ok(response) = &rec.response else {
            unreachable!()
        };
        let kept = encode(
            &rec.fingerprint,
            Ok((StatusCode::OK, &response.headers, b"b")),
            |n| n != "x-many",
        )
        .unwrap();
        let back = Record::decode(kept).unwrap().response.unwrap();
        assert!(back.headers.is_empty());
    }

    #[test]
    fn garbage_is_refused() {
        assert!(Record::decode(Bytes::from_static(b"")).is_err());
        assert!(Record::decode(Bytes::from_static(&[9; 60])).is_err());
        let mut good = Record {
            fingerprint: Fingerprint([1; 32]),
            response: Err(Unreplayable::TooLarge),
        }
        .encode()
        .to_vec();
        good.push(0);
        assert!(Record::decode(Bytes::from(good.clone())).is_err());
        good.truncate(20);
        assert!(Record::decode(Bytes::from(good)).is_err());
    }
}
