//! Benchmark of `fork` against real libvirt (qemu:///session) with the test
//! guest, each figure beside its floor measured in the same run:
//!
//! - `fork SRC A` until A answers on SSH; floor: the libvirt calls a fork
//!   cannot do without, made bare: a live snapshot of SRC's memory to RAM,
//!   then `virsh restore` of it until the banner;
//! - `fork SRC A B C D` until all four answer on SSH; floor: one live memory
//!   snapshot and four `virsh restore`s until the banner, one after another
//!   (bare libvirt restores a snapshot only as its own domain, once at a time).
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
            let out = env.json(&args);
            let wall = start.elapsed().as_secs_f64();
            walls.push(wall);
            // Each fork's own count, from the start of the fork to its banner.
            let ready: Vec<String> = out
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f["ssh_ready_seconds"].as_f64())
                .map(|s| format!("{s:.2}"))
                .collect();
            println!(
                "fork into {n}: {wall:.2} s; each fork ssh-ready after {} s",
                ready.join(", ")
            );
            let mut destroy = vec!["destroy", "--yes"];
            destroy.extend_from_slice(&FORKS[..n]);
            env.ok(&destroy);
        }
        let floor = median((0..RUNS).map(|_| snapshot_restore_floor(&env, n)).collect());
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
                "live memory snapshot to RAM + `virsh restore` + banner"
            } else {
                "live memory snapshot to RAM + 4 x (`virsh restore` + banner), one after another"
            },
            target: Some(if n == 1 { 1.0 } else { 2.0 }),
        });
    }
    support::report(
        "fork of the running test guest (TCG), median seconds:",
        &figures,
    );
}

/// Seconds for bare libvirt to do the work a fork of `n` needs: one live
/// snapshot of the source's memory to RAM (`/dev/shm`, where `fork` writes
/// it), then `n` restores of it until the banner. Bare libvirt cannot restore
/// a copy beside the running source (the saved UUID is taken), so the source
/// is destroyed, untimed, before each restore, and the copy restored is the
/// source itself; the last one is left running. The disk is not snapshotted
/// (`fork` also freezes it as a layer and gives each fork an overlay, so this
/// floor leaves out work a fork does). Restoring old memory over the live
/// disk is safe only because the test guest keeps no file system there and
/// writes nothing to it after boot: this floor is for that guest only. For
/// `n` > 1 it is a baseline rather than a floor: bare libvirt restores one
/// after another, `fork` side by side.
fn snapshot_restore_floor(env: &Env, n: usize) -> f64 {
    let domain = format!("agentvm-{SOURCE}");
    let port = env.status(SOURCE)["ssh_port"].as_u64().unwrap() as u16;
    let dir = tempfile::tempdir_in(agentvm::paths::FORK_MEMORY_SHM_DIR)
        .expect("a folder in /dev/shm for the floor's memory file");
    let file = dir.path().join("floor.mem");
    let memspec = format!("file={},snapshot=external", file.display());
    let start = Instant::now();
    virsh(&[
        "snapshot-create-as",
        &domain,
        "--no-metadata",
        "--live",
        "--memspec",
        &memspec,
        "--diskspec",
        "vda,snapshot=no",
    ]);
    let mut took = start.elapsed();
    for _ in 0..n {
        virsh(&["destroy", &domain]);
        let start = Instant::now();
        virsh(&["restore", file.to_str().unwrap()]);
        wait_banner(port, Duration::from_secs(60));
        took += start.elapsed();
    }
    took.as_secs_f64()
}
