//! Benchmark of `fork` against real libvirt (qemu:///session) with the test
//! guest, each figure beside its floor measured in the same run:
//!
//! - `fork SRC A` until A answers on SSH; floor: bare libvirt making a
//!   running copy of a running guest the only way it can, `virsh save` (which
//!   stops SRC) + `virsh restore` until the banner;
//! - `fork SRC A B C D` until all four answer on SSH; floor: one `virsh save`
//!   and four `virsh restore`s until the banner, one after another (a save
//!   image restores as its own domain only).
//!
//! Prints a table and JSON; asserts nothing about speed. Run with `.ci/bench
//! fork` (or `cargo bench --bench fork` as an unprivileged user).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use common::{Env, GUEST_TIMEOUT};
use support::{Figure, median, virsh, wait_banner};

const RUNS: usize = 3;
const SOURCE: &str = "bench-fk";
const FORKS: [&str; 4] = ["bench-fk-a", "bench-fk-b", "bench-fk-c", "bench-fk-d"];

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let env = Env::new();
    env.write_fleet(&format!("[vms.{SOURCE}]\n"));
    let mut owned: Vec<&str> = FORKS.to_vec();
    owned.push(SOURCE);
    env.owns(&owned);
    env.ok(&["up", SOURCE, "--timeout", GUEST_TIMEOUT]);
    let mut figures = Vec::new();
    for n in [1, 4] {
        let mut walls = Vec::new();
        for _ in 0..RUNS {
            let mut args = vec!["fork", SOURCE];
            args.extend_from_slice(&FORKS[..n]);
            args.extend_from_slice(&["--timeout", GUEST_TIMEOUT]);
            let start = Instant::now();
            env.json(&args);
            walls.push(start.elapsed().as_secs_f64());
            let mut destroy = vec!["destroy", "--yes"];
            destroy.extend_from_slice(&FORKS[..n]);
            env.ok(&destroy);
        }
        let floor = median((0..RUNS).map(|_| save_restore_floor(&env, n)).collect());
        figures.push(Figure {
            name: if n == 1 {
                "fork into 1, until it answers SSH"
            } else {
                "fork into 4, until all answer SSH"
            },
            unit: "s",
            agentvm: median(walls),
            floor,
            floor_is: if n == 1 {
                "`virsh save` + `virsh restore` + banner"
            } else {
                "`virsh save` + 4 x (`virsh restore` + banner)"
            },
            target: Some(if n == 1 { 1.0 } else { 2.0 }),
        });
    }
    support::report(
        "fork of the running test guest (TCG), median seconds:",
        &figures,
    );
}

/// Seconds for bare libvirt to bring `n` copies of the source's saved state
/// up to SSH: one save, then `n` restores until the banner (each copy is
/// destroyed, untimed, before the next restore). Leaves the source running.
fn save_restore_floor(env: &Env, n: usize) -> f64 {
    let domain = format!("agentvm-{SOURCE}");
    let port = env.status(SOURCE)["ssh_port"].as_u64().unwrap() as u16;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("floor.save");
    let file = file.to_str().unwrap();
    let mut took = Duration::ZERO;
    let start = Instant::now();
    virsh(&["save", &domain, file]);
    took += start.elapsed();
    for i in 0..n {
        let start = Instant::now();
        virsh(&["restore", file]);
        wait_banner(port, Duration::from_secs(60));
        took += start.elapsed();
        if i + 1 < n {
            virsh(&["destroy", &domain]);
        }
    }
    took.as_secs_f64()
}
