//! Stored records: decoding arbitrary bytes (a corrupt record, or one another tool wrote) never
//! panics, and a record that decodes re-encodes to bytes that decode to the same record.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tower_idempotency::record::Record;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = Record::decode(Bytes::copy_from_slice(data)) {
        let encoded = record.encode();
        let back = Record::decode(encoded.clone()).expect("a re-encoded record decodes");
        assert_eq!(back, record);
        assert_eq!(back.encode(), encoded, "encoding is not canonical");
    }
});
