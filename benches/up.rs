//! Benchmark of the local backend against real libvirt (qemu:///session) with the
//! test guest. Prints figures; asserts nothing about speed.
//!
//! - `up` without the guest's boot (`--no-wait`), split into image, overlay, xml,
//!   define and start, beside its floor (a `virsh start` of the same VM);
//! - overlay creation on a 1 GiB and a 50 GiB sparse base (the ratio should be ~1);
//! - `list --json` latency with 200 defined VMs;
//! - 1, 4 and 8 VMs brought up one by one and in one parallel `up`, with
//!   `--no-wait` and waiting for SSH: wall times and parallel/sequential ratio.
//!
//! Run with `.ci/bench` (or `cargo bench --bench up` as an unprivileged user).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use agentvm::image::{DiskFormat, qemu_img};
use common::Env;

const UP_RUNS: usize = 5;
const OVERLAY_RUNS: usize = 20;
const LIST_VMS: usize = 200;
const LIST_RUNS: usize = 20;

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    up_phases();
    overlay_vs_base_size();
    list_latency();
    parallel_up();
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn up_phases() {
    let env = Env::new();
    env.write_fleet("[vms.bench-up]\n");
    env.owns(&["bench-up"]);
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut totals = Vec::new();
    for run in 0..=UP_RUNS {
        let start = Instant::now();
        let out = env.json(&["up", "bench-up", "--no-wait"]);
        let total = start.elapsed().as_secs_f64() * 1000.0;
        env.ok(&["destroy", "--yes", "bench-up"]);
        if run == 0 {
            // The first run imports the image; report it on its own.
            let image = &out[0]["timings"][0];
            println!(
                "up (first, imports the image): {total:.0} ms wall, {} {:.1} ms",
                image["phase"],
                image["ms"].as_f64().unwrap_or_default()
            );
            continue;
        }
        totals.push(total);
        for phase in out[0]["timings"].as_array().unwrap() {
            phases
                .entry(phase["phase"].as_str().unwrap().to_string())
                .or_default()
                .push(phase["ms"].as_f64().unwrap());
        }
    }
    println!("up --no-wait of a new VM, median of {UP_RUNS} (image already imported):");
    for phase in ["image", "overlay", "xml", "define", "start"] {
        if let Some(ms) = phases.remove(phase) {
            println!("  {phase:<8} {:>8.1} ms", median(ms));
        }
    }
    println!(
        "  {:<8} {:>8.1} ms (whole command, process start included)",
        "wall",
        median(totals)
    );
    println!(
        "  floor    {:>8.1} ms (`virsh start` of the same defined VM, process start included)",
        virsh_start_floor(&env)
    );
}

/// The floor for `up --no-wait`: libvirt itself starting the VM agentvm
/// defined, timed around a whole `virsh start`, median of `UP_RUNS`.
fn virsh_start_floor(env: &Env) -> f64 {
    env.json(&["up", "bench-up", "--no-wait"]);
    let virsh = |args: &[&str]| {
        let out = std::process::Command::new("virsh")
            .args(["-q", "-c", "qemu:///session"])
            .args(args)
            .output()
            .expect("virsh (libvirt-clients)");
        assert!(out.status.success(), "virsh {args:?}: {out:?}");
    };
    let mut times = Vec::new();
    for _ in 0..UP_RUNS {
        virsh(&["destroy", "agentvm-bench-up"]);
        let start = Instant::now();
        virsh(&["start", "agentvm-bench-up"]);
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    env.ok(&["destroy", "--yes", "bench-up"]);
    median(times)
}

fn overlay_vs_base_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut medians = Vec::new();
    for gib in [1u64, 50] {
        let base = dir.path().join(format!("base-{gib}g.raw"));
        std::fs::File::create(&base)
            .unwrap()
            .set_len(gib << 30)
            .unwrap();
        let mut times = Vec::new();
        for i in 0..OVERLAY_RUNS {
            let overlay = dir.path().join(format!("overlay-{gib}-{i}.qcow2"));
            let start = Instant::now();
            qemu_img::create_overlay(&base, DiskFormat::Raw, &overlay, Some((gib + 10) << 30))
                .unwrap();
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        let m = median(times);
        println!("overlay on a {gib:>2} GiB sparse raw base: {m:.2} ms (median of {OVERLAY_RUNS})");
        medians.push(m);
    }
    println!(
        "overlay time ratio 50 GiB / 1 GiB: {:.2}",
        medians[1] / medians[0]
    );
}

fn list_latency() {
    let env = Env::new();
    let names: Vec<String> = (0..LIST_VMS)
        .map(|i| format!("bench-list-{i:02}"))
        .collect();
    let fleet: String = names.iter().map(|n| format!("[vms.{n}]\n")).collect();
    env.write_fleet(&fleet);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    env.owns(&refs);
    for chunk in refs.chunks(10) {
        let mut args = vec!["up", "--no-wait"];
        args.extend_from_slice(chunk);
        env.ok(&args);
        let mut args = vec!["down", "--force"];
        args.extend_from_slice(chunk);
        env.ok(&args);
    }
    let mut times = Vec::new();
    for _ in 0..LIST_RUNS {
        let start = Instant::now();
        let listed = env.json(&["list"]);
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        assert!(listed.as_array().unwrap().len() >= LIST_VMS);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "list --json with {LIST_VMS} defined VMs: median {:.1} ms, p90 {:.1} ms, max {:.1} ms ({LIST_RUNS} runs)",
        times[LIST_RUNS / 2],
        times[LIST_RUNS * 9 / 10],
        times[LIST_RUNS - 1]
    );
}

fn timed(env: &Env, args: &[&str]) -> f64 {
    let start = Instant::now();
    env.ok(args);
    start.elapsed().as_secs_f64()
}

fn parallel_up() {
    let env = Env::new();
    let names: Vec<String> = (0..8).map(|i| format!("bench-par-{i}")).collect();
    env.write_fleet(
        &names
            .iter()
            .map(|n| format!("[vms.{n}]\n"))
            .collect::<String>(),
    );
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    env.owns(&all);
    let destroy = |vms: &[&str]| {
        let mut args = vec!["destroy", "--yes"];
        args.extend_from_slice(vms);
        env.ok(&args);
    };
    println!("up of N VMs (TCG guests), wall seconds:");
    println!(
        "  {:>2}  {:<8} {:>11} {:>9} {:>7}",
        "N", "mode", "sequential", "parallel", "ratio"
    );
    for n in [1usize, 4, 8] {
        let vms = &all[..n];
        for (mode, extra) in [
            ("no-wait", vec!["--no-wait"]),
            ("waited", vec!["--timeout", "600"]),
        ] {
            let mut sequential = 0.0;
            for vm in vms {
                let mut args = vec!["up", *vm];
                args.extend(&extra);
                sequential += timed(&env, &args);
            }
            destroy(vms);
            let mut args = vec!["up"];
            args.extend_from_slice(vms);
            args.extend(&extra);
            let parallel = timed(&env, &args);
            destroy(vms);
            println!(
                "  {n:>2}  {mode:<8} {sequential:>11.2} {parallel:>9.2} {:>7.2}",
                parallel / sequential
            );
        }
    }
}
