//! A stored tunnel record as `RedbStore::load` decodes it at start: arbitrary bytes →
//! `TunnelRecord`. Never panics; what decodes survives a store round trip and becomes a grant
//! whose record is unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnelbot::grants::Grant;
use tunnelbot::store::TunnelRecord;

fuzz_target!(|data: &[u8]| {
    let record = match serde_json::from_slice::<TunnelRecord>(data) {
        Ok(r) => r,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let bytes = serde_json::to_vec(&record).expect("a decoded record encodes");
    let again: TunnelRecord = serde_json::from_slice(&bytes).expect("an encoded record decodes");
    assert_eq!(again, record);
    let grant = Grant::new(record.clone());
    assert_eq!(grant.to_record(), record);
    assert_eq!(grant.port(), record.port);
    assert_eq!(grant.ended(), record.ended);
    if let Some(ended) = record.ended {
        let _ = ended.reason.as_str();
        // Ending an ended grant keeps the first reason.
        assert!(!grant.end(ended));
    }
    let _ = tunnelbot::admin::rfc3339(record.created_at);
    let _ = tunnelbot::admin::rfc3339(record.expires_at);
});
