//! Benchmark of `fork` against real libvirt (qemu:///session) with the test
//! guest. Prints figures; asserts nothing about speed.
//!
//! - `fork SRC A` until A answers on SSH, and the snapshot's share of it;
//! - `fork SRC A B C D` until all four answer on SSH.
//!
//! Run with `.ci/bench` (or `cargo bench --bench fork` as an unprivileged user).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::{Env, GUEST_TIMEOUT};

const RUNS: usize = 3;

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let env = Env::new();
    env.write_fleet("[vms.bench-fk]\n");
    let forks = ["bench-fk-a", "bench-fk-b", "bench-fk-c", "bench-fk-d"];
    let mut owned: Vec<&str> = forks.to_vec();
    owned.push("bench-fk");
    env.owns(&owned);
    env.ok(&["up", "bench-fk", "--timeout", GUEST_TIMEOUT]);
    for n in [1, 4] {
        let mut walls = Vec::new();
        let mut slowest = Vec::new();
        for _ in 0..RUNS {
            let mut args = vec!["fork", "bench-fk"];
            args.extend_from_slice(&forks[..n]);
            args.extend_from_slice(&["--timeout", GUEST_TIMEOUT]);
            let start = Instant::now();
            let out = env.json(&args);
            walls.push(start.elapsed().as_secs_f64());
            slowest.push(
                out.as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|f| f["ssh_ready_seconds"].as_f64())
                    .fold(0.0, f64::max),
            );
            let mut destroy = vec!["destroy", "--yes"];
            destroy.extend_from_slice(&forks[..n]);
            env.ok(&destroy);
        }
        println!(
            "fork bench-fk into {n} until every fork answers on SSH, {RUNS} runs: median {:.2} s wall \
             (the slowest fork ssh-ready {:.2} s after the fork began)",
            median(walls),
            median(slowest)
        );
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}
