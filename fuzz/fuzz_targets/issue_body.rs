//! The body of `POST /api/v1/tunnels`: arbitrary bytes → `IssueBody`, both directly with
//! serde_json and through axum's `Json` extractor (what the handler really runs, including
//! the rejection text sent back). Neither may panic, and they must agree.
//!
//! When a body decodes and carries a `public_key`, the key is put through the same steps
//! `Broker::issue` takes (OpenSSH parse, strip comment, re-encode, fingerprint), since that is
//! the next parser the outside input reaches. Keep this in step with `src/broker.rs`.
#![no_main]

use axum::Json;
use axum::response::IntoResponse;
use libfuzzer_sys::fuzz_target;
use russh::keys::{HashAlg, PublicKey};
use tunnelbot::admin::IssueBody;

fuzz_target!(|data: &[u8]| {
    let direct = serde_json::from_slice::<IssueBody>(data);
    let via_axum = Json::<IssueBody>::from_bytes(data);
    match (&direct, via_axum) {
        (Ok(a), Ok(Json(b))) => {
            assert_eq!(a.user, b.user);
            assert_eq!(a.server_name, b.server_name);
            assert_eq!(a.ttl_seconds, b.ttl_seconds);
            assert_eq!(a.public_key, b.public_key);
        }
        (Err(_), Err(rejection)) => {
            let _ = rejection.body_text();
            let _ = rejection.into_response();
        }
        (d, a) => panic!(
            "serde_json and axum disagree: direct ok = {}, axum ok = {}",
            d.is_ok(),
            a.is_ok()
        ),
    }
    let Ok(body) = direct else {
        return;
    };
    if let Some(ttl) = body.ttl_seconds {
        let _ = std::time::Duration::from_secs(ttl);
    }
    if let Some(text) = body.public_key {
        if let Ok(key) = PublicKey::from_openssh(text.trim()) {
            let mut clean = key.clone();
            clean.set_comment("");
            let _ = clean.to_openssh();
            let _ = key.fingerprint(HashAlg::Sha256).to_string();
        }
    }
});
