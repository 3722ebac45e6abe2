//! Broker start on arbitrary stored state: `TunnelRecord`s (what `RedbStore::load` hands back,
//! one record per id) → `Broker::open`, which restores them, then `reap`. Records are whatever
//! a damaged or hand-edited state file may hold: any times, any port, ended or not, repeated
//! keys.
//!
//! Input: a JSON array of records when it starts with '[' (readable seeds and reproducers);
//! otherwise up to 16 records built from the raw bytes, with times drawn near "now", near
//! `u64::MAX` or anywhere, ports mostly in the configured range and ids and key fingerprints
//! from small sets so they collide. (Decoding the JSON itself is `stored_record`'s job.)
//!
//! Never panics; with a store that cannot fail, `open` succeeds; what comes back active has
//! not expired and holds a key no other grant holds. Every tunnel is then revoked so its
//! listener closes.
//!
//! Setup: one runtime per process; an in-memory store, CHP off, tunnel ports 47000-47099 on
//! 127.0.0.1 (loopback listeners are bound and closed), keys in
//! `$TMPDIR/tunnelbot-fuzz-restore/`.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tunnelbot_fuzz::MemStore;
use tunnelbot::keys::Keys;
use tunnelbot::metrics::Metrics;
use tunnelbot::store::{EndReason, Ended, TunnelRecord, unix_now};
use tunnelbot::{Broker, Config};


const CONFIG: &str = r#"
[ssh]
listen = "127.0.0.1:0"
[tunnels]
bind_address = "127.0.0.1"
ports = "47000-47099"
[routes]
backend = "none"
"#;

struct Setup {
    rt: tokio::runtime::Runtime,
    config: Config,
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut config = Config::parse(CONFIG).unwrap();
        config.keys_dir = std::env::temp_dir().join("tunnelbot-fuzz-restore");
        config.validate().unwrap();
        Keys::load_or_create(&config.keys_dir).unwrap();
        Setup { rt, config }
    })
}

fn time(u: &mut Unstructured, now: u64) -> Result<u64> {
    Ok(match u.int_in_range(0..=3)? {
        0 => now.saturating_add_signed(i64::from(u.arbitrary::<i32>()?)),
        1 => u64::MAX - u64::from(u.arbitrary::<u16>()?),
        2 => u64::from(u.arbitrary::<u16>()?),
        _ => u.arbitrary()?,
    })
}

fn record(u: &mut Unstructured, now: u64) -> Result<TunnelRecord> {
    Ok(TunnelRecord {
        id: format!("tb_{}", u.int_in_range(0..=7)?),
        user: u.arbitrary()?,
        server_name: u.arbitrary()?,
        port: if u.ratio(1, 8)? {
            u.arbitrary()?
        } else {
            u.int_in_range(47000..=47099)?
        },
        public_key: String::new(),
        fingerprint: format!("SHA256:{}", u.int_in_range(0..=7)?),
        created_at: time(u, now)?,
        expires_at: time(u, now)?,
        ended: if u.arbitrary()? {
            Some(Ended {
                at: time(u, now)?,
                reason: if u.arbitrary()? {
                    EndReason::Revoked
                } else {
                    EndReason::Expired
                },
            })
        } else {
            None
        },
        ttl_seconds: u.arbitrary()?,
        // Any lease and renewal time, so lease arithmetic meets extreme values too.
        lease_seconds: u.arbitrary()?,
        renewed_at: if u.arbitrary()? {
            Some(time(u, now)?)
        } else {
            None
        },
    })
}

fn records(data: &[u8], now: u64) -> Option<Vec<TunnelRecord>> {
    if data.first() == Some(&b'[') {
        return serde_json::from_slice(data).ok();
    }
    let mut u = Unstructured::new(data);
    let mut out = Vec::new();
    while !u.is_empty() && out.len() < 16 {
        out.push(record(&mut u, now).ok()?);
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let Some(records) = records(data, unix_now()) else {
        return;
    };
    if records.len() > 16 {
        return;
    }
    // A redb table holds one record per id; the last write wins.
    let stored: HashMap<String, TunnelRecord> =
        records.into_iter().map(|r| (r.id.clone(), r)).collect();
    let ids: HashSet<String> = stored.keys().cloned().collect();
    let s = setup();
    s.rt.block_on(async {
        let keys = Keys::load_or_create(&s.config.keys_dir).unwrap();
        let before = unix_now();
        let broker = Broker::open(
            s.config.clone(),
            keys,
            Arc::new(MemStore(Mutex::new(stored))),
            Metrics::new().unwrap(),
            SocketAddr::from(([127, 0, 0, 1], 2222)),
        )
        .await
        .unwrap_or_else(|e| panic!("open failed on a store that cannot fail: {e:#}"));
        broker.reap().await;
        let mut fingerprints = HashSet::new();
        let all = broker.list();
        for (grant, _) in &all {
            assert!(
                ids.contains(grant.id()),
                "grant {} was never stored",
                grant.id()
            );
            if grant.ended().is_none() {
                assert!(
                    grant.expires_at() > before,
                    "{} restored active though it expired at {}",
                    grant.id(),
                    grant.expires_at()
                );
                assert!(
                    fingerprints.insert(grant.fingerprint().to_owned()),
                    "two active grants hold key {:?}",
                    grant.fingerprint()
                );
            }
        }
        for (grant, _) in all {
            broker
                .revoke(grant.id())
                .await
                .unwrap_or_else(|e| panic!("revoking {}: {e:#}", grant.id()));
        }
    });
});
