//! What the benchmarks share: figures beside their floors (bare libvirt or
//! QEMU doing the same work, measured in the same run), printed as a table
//! and as JSON, and appended to `$AGENTVM_BENCH_FIGURES` (tab-separated, one
//! figure per line) so `.ci/bench` can print every bench's figures in one
//! table at the end. Benchmarks assert nothing about speed.

#![allow(dead_code)]

use std::io::Write;
use std::process::Command;
use std::time::Duration;

/// Where `.ci/bench` collects the figures of all benches.
pub const ENV_FIGURES: &str = "AGENTVM_BENCH_FIGURES";

/// One measured figure and its floor.
pub struct Figure {
    pub name: &'static str,
    pub unit: &'static str,
    pub agentvm: f64,
    pub floor: f64,
    /// What the floor is (bare libvirt/QEMU doing the same work).
    pub floor_is: &'static str,
    /// The figure the issue asks for, if any (`<= 100 ms`).
    pub target: Option<f64>,
}

/// Prints `figures` as a table and one JSON line, and appends them to
/// `$AGENTVM_BENCH_FIGURES` when set.
pub fn report(title: &str, figures: &[Figure]) {
    println!("{title}");
    println!(
        "  {:<40} {:>10} {:>10} {:>6} {:>8}  floor",
        "figure", "agentvm", "floor", "ratio", "target"
    );
    for f in figures {
        let target = f.target.map_or("-".to_string(), |t| format!("{t}"));
        println!(
            "  {:<40} {:>10} {:>10} {:>6.2} {:>8}  {}",
            f.name,
            format!("{:.1} {}", f.agentvm, f.unit),
            format!("{:.1} {}", f.floor, f.unit),
            f.agentvm / f.floor,
            target,
            f.floor_is
        );
    }
    let json: Vec<_> = figures
        .iter()
        .map(|f| {
            serde_json::json!({
                "figure": f.name, "unit": f.unit, "agentvm": f.agentvm, "floor": f.floor,
                "ratio": f.agentvm / f.floor, "target": f.target, "floor_is": f.floor_is,
            })
        })
        .collect();
    println!("{}", serde_json::Value::Array(json));
    if let Ok(path) = std::env::var(ENV_FIGURES) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        for f in figures {
            writeln!(
                file,
                "{}\t{:.1}\t{:.1}\t{}\t{}\t{}",
                f.name,
                f.agentvm,
                f.floor,
                f.unit,
                f.target.map_or("-".to_string(), |t| format!("{t}")),
                f.floor_is
            )
            .unwrap();
        }
    }
}

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Runs `virsh -q -c qemu:///session ARGS…`; panics with its output on failure.
pub fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", "qemu:///session"])
        .args(args)
        .output()
        .expect("virsh (libvirt-clients)");
    assert!(out.status.success(), "virsh {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until 127.0.0.1:`port` sends an SSH banner, the way `up` waits.
pub fn wait_banner(port: u16, timeout: Duration) {
    if let Err(e) = agentvm::ssh::wait_for_banner(port, timeout, || Ok(true)) {
        panic!("{e:#}");
    }
}

/// The live XML of `domain` turned into a transient domain of its own name
/// `new_name` (no UUID: libvirt makes one), for `virsh create`.
pub fn floor_domain_xml(domain: &str, new_name: &str) -> String {
    let xml = virsh(&["dumpxml", "--inactive", domain]);
    let mut out = String::new();
    for line in xml.lines() {
        let t = line.trim();
        if t.starts_with("<uuid>") {
            continue;
        }
        if t.starts_with("<name>") {
            out.push_str(&format!("  <name>{new_name}</name>\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
