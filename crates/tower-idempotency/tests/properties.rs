//! Property tests: the record codec round-trips every record and refuses every truncation, and
//! the request fingerprint is stable and tells its parts apart.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::collection::vec;
use proptest::prelude::*;
use tower_idempotency::Fingerprint;
use tower_idempotency::record::{Record, StoredResponse, Unreplayable};

/// A header name: a well-known one (stored by `http` in its own representation) or any token.
fn header_name() -> impl Strategy<Value = HeaderName> {
    prop_oneof![
        prop::sample::select(vec![
            "content-type",
            "location",
            "cache-control",
            "etag",
            "x-a",
            "x-b",
        ])
        .prop_map(HeaderName::from_static),
        "[a-z0-9!#$%&'*+.^_`|~-]{1,40}"
            .prop_map(|n| HeaderName::from_bytes(n.as_bytes()).expect("a token is a header name")),
    ]
}

/// A header value: any bytes `http` accepts, including obs-text (non-UTF-8) and tabs.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    vec(
        prop_oneof![0x20u8..=0x7e, 0x80u8..=0xff, Just(b'\t')],
        0..48,
    )
    .prop_map(|v| HeaderValue::from_bytes(&v).expect("no control characters"))
}

fn headers() -> impl Strategy<Value = HeaderMap> {
    // A small pool of names next to the arbitrary ones makes repeated names common.
    vec((header_name(), header_value()), 0..16).prop_map(|pairs| {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(name, value);
        }
        map
    })
}

fn response() -> impl Strategy<Value = StoredResponse> {
    (100u16..=999, headers(), vec(any::<u8>(), 0..512)).prop_map(|(status, headers, body)| {
        StoredResponse {
            status: StatusCode::from_u16(status).expect("100..=999"),
            headers,
            body: Bytes::from(body),
        }
    })
}

fn record() -> impl Strategy<Value = Record> {
    let response = prop_oneof![
        8 => response().prop_map(Ok),
        1 => Just(Err(Unreplayable::TooLarge)),
        1 => Just(Err(Unreplayable::OutcomeUnknown)),
    ];
    (any::<[u8; 32]>(), response).prop_map(|(fingerprint, response)| Record {
        fingerprint: Fingerprint(fingerprint),
        response,
    })
}

type Parts = [Vec<u8>; 5];

fn fingerprint(p: &Parts) -> Fingerprint {
    Fingerprint::compute(&p[0], &p[1], &p[2], &p[3], &p[4])
}

fn parts() -> impl Strategy<Value = Parts> {
    [
        vec(any::<u8>(), 0..16),
        vec(any::<u8>(), 0..32),
        vec(any::<u8>(), 0..32),
        vec(any::<u8>(), 0..32),
        vec(any::<u8>(), 0..128),
    ]
}

proptest! {
    #[test]
    fn record_round_trips(rec in record()) {
        let encoded = rec.encode();
        let back = Record::decode(encoded.clone()).unwrap();
        prop_assert_eq!(&back, &rec);
        // Repeated values keep their order, byte for byte.
        if let (Ok(a), Ok(b)) = (&rec.response, &back.response) {
            for name in a.headers.keys() {
                let want: Vec<&[u8]> = a.headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
                let got: Vec<&[u8]> = b.headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
                prop_assert_eq!(want, got);
            }
        }
        prop_assert_eq!(back.encode(), encoded);
    }
}

proptest! {
    // Each case decodes every prefix of an encoding (up to a few KiB): fewer cases keep the
    // test at a few seconds in a debug build.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_strict_prefix_and_any_extension_is_refused(rec in record(), extra in vec(any::<u8>(), 1..8)) {
        let encoded = rec.encode();
        for len in 0..encoded.len() {
            prop_assert!(Record::decode(encoded.slice(..len)).is_err(), "a prefix of {} bytes decoded", len);
        }
        let mut longer = encoded.to_vec();
        longer.extend_from_slice(&extra);
        prop_assert!(Record::decode(Bytes::from(longer)).is_err());
    }
}

proptest! {
    #[test]
    fn fingerprint_is_stable(p in parts()) {
        prop_assert_eq!(fingerprint(&p), fingerprint(&p.clone()));
    }

    #[test]
    fn changing_any_one_part_changes_the_fingerprint(
        p in parts(),
        which in 0usize..5,
        other in vec(any::<u8>(), 0..32),
    ) {
        prop_assume!(p[which] != other);
        let mut q = p.clone();
        q[which] = other;
        prop_assert_ne!(fingerprint(&p), fingerprint(&q));
    }

    #[test]
    fn moving_bytes_between_adjacent_parts_changes_the_fingerprint(
        p in parts(),
        boundary in 0usize..4,
        take in 1usize..16,
        leftwards in any::<bool>(),
    ) {
        let (i, j) = (boundary, boundary + 1);
        let mut q = p.clone();
        if leftwards {
            // The first bytes of part j become the last bytes of part i.
            let n = take.min(q[j].len());
            prop_assume!(n > 0);
            let moved: Vec<u8> = q[j].drain(..n).collect();
            q[i].extend_from_slice(&moved);
        } else {
            // The last bytes of part i become the first bytes of part j.
            let n = take.min(q[i].len());
            prop_assume!(n > 0);
            let at = q[i].len() - n;
            let moved = q[i].split_off(at);
            q[j].splice(0..0, moved);
        }
        // The concatenation is unchanged: only the split moved.
        prop_assert_eq!(p.concat(), q.concat());
        prop_assert_ne!(fingerprint(&p), fingerprint(&q));
    }
}

/// The recipe is pinned: a stored fingerprint must still match after an upgrade, so a change of
/// recipe has to come with a new version tag (and this vector changes only then).
#[test]
fn fingerprint_recipe_is_pinned() {
    let fp = Fingerprint::compute(
        b"POST",
        b"/orders",
        b"item=book",
        b"application/json",
        br#"{"qty":1}"#,
    );
    let hex: String = fp.0.iter().map(|b| format!("{b:02x}")).collect();
    // The same digest, computed independently: sha256 over each of ("tower-idempotency
    // fingerprint v1", method, path, query, content type, body) as a u64 big-endian length
    // followed by the bytes.
    assert_eq!(
        hex,
        "36e65bf843196df55c5bcdaafa0203478884c49ecce9a3431737caf7a188363f"
    );
}
