//! Hub port reservation and release (`PortPool`), alone and with threads contending.
//!
//! Every issue reserves a port and every revoke or expiry releases one, and a job-array spawn
//! issues hundreds at once from concurrent admin requests. A reservation is a real bound
//! listener, so its cost is mostly syscalls; the figures show what one costs, how the pool's
//! lock behaves when several issuers arrive together, and what the next-fit scan adds when the
//! pool is nearly full. Loopback only (its own 127.43.x.y). Run: `cargo bench --bench port_pool`.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tunnelbot::config::PortRange;
use tunnelbot::ports::PortPool;

/// Its own 127.43.x.y (the tests use 127.100-199.x.y), so no concurrent test or bench holds
/// these ports and every reservation measures a bind that succeeds.
fn bench_ip() -> IpAddr {
    let pid = std::process::id();
    IpAddr::from([127, 43, (pid / 250 % 250) as u8, (pid % 250 + 1) as u8])
}

/// One issue and its revoke: reserve, close the listener, give the port back.
fn cycle(pool: &PortPool) {
    let (port, listener) = pool
        .reserve()
        .unwrap_or_else(|e| panic!("reserve failed: {e}"));
    drop(black_box(listener));
    pool.release(port);
}

/// `iters` cycles shared among `threads` threads; the wall time from a common start.
fn contended(pool: &Arc<PortPool>, threads: u64, iters: u64) -> Duration {
    let start_line = Arc::new(Barrier::new(threads as usize + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let pool = Arc::clone(pool);
            let start_line = Arc::clone(&start_line);
            // An even split, the remainder to the first threads, so exactly `iters` run.
            let share = iters / threads + u64::from(t < iters % threads);
            std::thread::spawn(move || {
                start_line.wait();
                for _ in 0..share {
                    cycle(&pool);
                }
            })
        })
        .collect();
    start_line.wait();
    let start = Instant::now();
    for w in workers {
        w.join().unwrap_or_else(|_| panic!("a worker panicked"));
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let ip = bench_ip();
    let mut g = c.benchmark_group("port_pool");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    // The default pool's range; only a handful of ports are ever held at once here.
    let pool = Arc::new(PortPool::new(
        PortRange::new(20000, 29999).unwrap_or_else(|e| panic!("{e}")),
        ip,
    ));
    for threads in [1u64, 2, 4] {
        g.bench_with_input(
            BenchmarkId::new("reserve_release", format!("{threads}_threads")),
            &threads,
            |b, &threads| b.iter_custom(|iters| contended(&pool, threads, iters)),
        );
    }

    // 9,999 of 10,000 ports taken (marked, as a restart marks ports it could not bind): each
    // reserve scans the whole ring from the cursor before it finds the one free port.
    let full = PortPool::new(
        PortRange::new(20000, 29999).unwrap_or_else(|e| panic!("{e}")),
        ip,
    );
    for port in 20001..=29999 {
        full.mark_reserved(port);
    }
    g.bench_function("reserve_release_one_free_of_10k", |b| {
        b.iter(|| cycle(&full))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
