//! Credential lookup (`Grants`): the login decision and the lookup by tunnel id.
//!
//! Every SSH login asks `Grants::authenticate` by key fingerprint, including every failed try
//! from a scanner, and the admin API and reaper look grants up by id. A hub can hold thousands
//! of grants (a job array, plus ended ones kept for `tunnels.retention`), so the lookup must
//! not grow with the table: it is measured at 10 and at 10,000 grants. The fingerprint itself,
//! which the broker computes from the offered key before the lookup, is measured alongside.
//! Run: `cargo bench --bench credential_lookup`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};
use tunnelbot::grants::{Grant, Grants};
use tunnelbot::store::TunnelRecord;

const SSH_USER: &str = "tunnelbot";
const NOW: u64 = 1_800_000_000;

/// Lookups cycle through this many different grants, so the figure is not one hot cache line.
const PROBES: usize = 1024;

/// A grant table of `n` live grants, built from real ed25519 keys as `Broker::issue` builds it,
/// and the keys' public halves.
fn table(n: usize) -> (Grants, Vec<TunnelRecord>, Vec<PublicKey>) {
    let grants = Grants::default();
    let mut records = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
            .unwrap_or_else(|e| panic!("generating a key: {e}"));
        let public = key.public_key().clone();
        let record = TunnelRecord {
            id: format!("tb_{:032x}", 0x5eed_0000_u128 + i as u128),
            user: format!("user{i}"),
            server_name: String::new(),
            port: 20000 + (i % 10_000) as u16,
            public_key: public
                .to_openssh()
                .unwrap_or_else(|e| panic!("encoding a key: {e}")),
            fingerprint: public.fingerprint(HashAlg::Sha256).to_string(),
            created_at: NOW - 60,
            expires_at: NOW + 8 * 3600,
            ..TunnelRecord::default()
        };
        grants
            .insert(Arc::new(Grant::new(record.clone())))
            .unwrap_or_else(|e| panic!("{e}"));
        records.push(record);
        keys.push(public);
    }
    (grants, records, keys)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("credential_lookup");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));

    for n in [10usize, 10_000] {
        let (grants, records, keys) = table(n);
        let step = (n / PROBES).max(1);
        let probes: Vec<&TunnelRecord> = records.iter().step_by(step).take(PROBES).collect();
        // Fingerprints no grant holds: what a scanner's keys or a revoked-and-purged job sends.
        let strangers: Vec<String> = (0..PROBES.min(n))
            .map(|i| format!("SHA256:{:0>43}", format!("nobody{i}")))
            .collect();

        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("authenticate_hit", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % probes.len();
                let fp = &probes[i].fingerprint;
                black_box(grants.authenticate(SSH_USER, SSH_USER, black_box(fp), NOW))
                    .unwrap_or_else(|e| panic!("{e}"))
            })
        });
        g.bench_with_input(BenchmarkId::new("authenticate_unknown", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % strangers.len();
                black_box(grants.authenticate(SSH_USER, SSH_USER, black_box(&strangers[i]), NOW))
                    .is_err()
            })
        });
        g.bench_with_input(BenchmarkId::new("get_by_id", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % probes.len();
                black_box(grants.get(black_box(&probes[i].id)))
                    .unwrap_or_else(|| panic!("grant missing"))
            })
        });
        if n == 10 {
            // Independent of the table size: measured once.
            g.bench_function("fingerprint_sha256", |b| {
                b.iter(|| {
                    i = (i + 1) % keys.len();
                    black_box(&keys[i]).fingerprint(HashAlg::Sha256).to_string()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
