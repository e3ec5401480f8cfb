//! Benchmark of the local backend against real libvirt (qemu:///session) with the
//! test guest. Prints figures; asserts nothing about speed.
//!
//! - `up` without the guest's boot (`--no-wait`), split into image, overlay, xml,
//!   define and start, beside its floor (a `virsh create` of the same domain XML);
//! - overlay creation on a 1 GiB and a 50 GiB sparse base (the ratio should be ~1);
//! - `list --json` latency with 200 defined VMs, beside `virsh list --all`;
//! - 8 VMs in one parallel `up` until all answer SSH, beside 8 `virsh create`s
//!   of their domain XML started at once until all banners.
//!
//! Each figure is printed beside its floor (table and JSON, `support::report`).
//!
//! Run with `.ci/bench` (or `cargo bench --bench up` as an unprivileged user).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agentvm::image::{DiskFormat, qemu_img};
use common::Env;
use support::{Figure, floor_domain_xml, median, virsh, wait_banner};

const UP_RUNS: usize = 5;
const OVERLAY_RUNS: usize = 20;
const LIST_VMS: usize = 200;
const LIST_RUNS: usize = 20;

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let mut figures = vec![up_phases()];
    overlay_vs_base_size();
    figures.push(list_latency());
    figures.push(parallel_up());
    support::report("up and list (TCG guests):", &figures);
}

fn up_phases() -> Figure {
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
    let wall = median(totals);
    println!(
        "  {:<8} {wall:>8.1} ms (whole command, process start included)",
        "wall"
    );
    Figure {
        name: "up --no-wait of a new VM",
        unit: "ms",
        agentvm: wall,
        floor: virsh_create_floor(&env),
        floor_is: "`virsh create` of the same domain XML",
        target: None,
    }
}

/// The floor for `up --no-wait`: libvirt itself creating and starting the
/// domain agentvm made (its XML under another name), timed around a whole
/// `virsh create`, median of `UP_RUNS`.
fn virsh_create_floor(env: &Env) -> f64 {
    env.json(&["up", "bench-up", "--no-wait"]);
    env.ok(&["down", "--force", "bench-up"]);
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("floor.xml");
    std::fs::write(&xml, floor_domain_xml("agentvm-bench-up", "bench-up-floor")).unwrap();
    let xml = xml.to_str().unwrap();
    let mut times = Vec::new();
    for _ in 0..UP_RUNS {
        let start = Instant::now();
        virsh(&["create", xml]);
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        virsh(&["destroy", "bench-up-floor"]);
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

fn list_latency() -> Figure {
    let env = Env::new();
    let names: Vec<String> = (0..LIST_VMS)
        .map(|i| format!("bench-list-{i:02}"))
        .collect();
    let fleet: String = names.iter().map(|n| format!("[vms.{n}]\n")).collect();
    env.write_fleet(&fleet);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    env.owns(&refs);
    // The same verbs on one running VM, first as the only VM, then among 200.
    let scale_vm = refs[LIST_VMS - 1];
    env.ok(&["up", scale_vm, "--timeout", "600"]);
    let alone = verb_times(&env, scale_vm);
    for chunk in refs[..LIST_VMS - 1].chunks(10) {
        let mut args = vec!["up", "--no-wait"];
        args.extend_from_slice(chunk);
        env.ok(&args);
        let mut args = vec!["down", "--force"];
        args.extend_from_slice(chunk);
        env.ok(&args);
    }
    let among = verb_times(&env, scale_vm);
    println!(
        "one VM's verbs with 1 and with {LIST_VMS} defined VMs, median ms (each should not grow):"
    );
    for ((verb, one), (_, many)) in alone.iter().zip(&among) {
        println!(
            "  {verb:<26} {one:>8.1} {many:>8.1}  ratio {:.2}",
            many / one
        );
    }
    let mut times = Vec::new();
    for _ in 0..LIST_RUNS {
        let start = Instant::now();
        let listed = env.json(&["list"]);
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        assert!(listed.as_array().unwrap().len() >= LIST_VMS);
    }
    let floor = median(
        (0..LIST_RUNS)
            .map(|_| {
                let start = Instant::now();
                virsh(&["list", "--all"]);
                start.elapsed().as_secs_f64() * 1000.0
            })
            .collect(),
    );
    Figure {
        name: "list --json with 200 defined VMs",
        unit: "ms",
        agentvm: median(times),
        floor,
        floor_is: "`virsh list --all`",
        target: Some(100.0),
    }
}

/// Median ms of `exec VM -- true`, `status VM --json` and `down`/`up
/// --no-wait` cycles on the running VM `vm` (left running).
fn verb_times(env: &Env, vm: &str) -> Vec<(&'static str, f64)> {
    let time = |args: &[&str]| {
        let start = Instant::now();
        env.ok(args);
        start.elapsed().as_secs_f64() * 1000.0
    };
    let exec = median(
        (0..LIST_RUNS)
            .map(|_| time(&["exec", vm, "--", "true"]))
            .collect(),
    );
    let status = median(
        (0..LIST_RUNS)
            .map(|_| time(&["status", vm, "--json"]))
            .collect(),
    );
    let down = median(
        (0..5)
            .map(|_| {
                let took = time(&["down", "--force", vm]);
                env.ok(&["up", vm, "--no-wait"]);
                took
            })
            .collect(),
    );
    env.ok(&["up", vm, "--timeout", "600"]);
    vec![
        ("exec VM -- true", exec),
        ("status VM --json", status),
        ("down --force VM", down),
    ]
}

/// 8 VMs in one `up` until each answers SSH, beside bare libvirt booting the
/// same 8 domains (their XML under other names) at once until every banner.
fn parallel_up() -> Figure {
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
    let mut args = vec!["up"];
    args.extend_from_slice(&all);
    args.extend(["--timeout", "600"]);
    let start = Instant::now();
    env.ok(&args);
    let ours = start.elapsed().as_secs_f64();
    let ports: Vec<u16> = all
        .iter()
        .map(|n| env.status(n)["ssh_port"].as_u64().unwrap() as u16)
        .collect();
    let mut down = vec!["down", "--force"];
    down.extend_from_slice(&all);
    env.ok(&down);
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<_> = all
        .iter()
        .map(|n| {
            let file = dir.path().join(format!("{n}.xml"));
            let xml = floor_domain_xml(&format!("agentvm-{n}"), &format!("{n}-floor"));
            std::fs::write(&file, xml).unwrap();
            file
        })
        .collect();
    let start = Instant::now();
    std::thread::scope(|scope| {
        for (file, port) in files.iter().zip(&ports) {
            scope.spawn(move || {
                virsh(&["create", file.to_str().unwrap()]);
                wait_banner(*port, Duration::from_secs(600));
            });
        }
    });
    let floor = start.elapsed().as_secs_f64();
    for n in &all {
        virsh(&["destroy", &format!("{n}-floor")]);
    }
    let mut destroy = vec!["destroy", "--yes"];
    destroy.extend_from_slice(&all);
    env.ok(&destroy);
    Figure {
        name: "up of 8 VMs at once, until all answer SSH",
        unit: "s",
        agentvm: ours,
        floor,
        floor_is: "8 `virsh create` at once + banners",
        target: None,
    }
}
