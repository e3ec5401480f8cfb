//! Throughput of `agentvm cp` against a real Debian guest (qemu:///session):
//! a 20 MiB file to the guest and back, over SSH and through the guest agent,
//! as MiB/s (median of a few runs). Prints figures; asserts nothing about speed.
//!
//! Run with `.ci/bench cp` (or `cargo bench --bench cp` as an unprivileged
//! user, with `AGENTVM_DEBIAN_IMAGE` naming the Debian guest's qcow2).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Env, debian_image};

const VM: &str = "bench-cp";
const SIZE: usize = 20 << 20;
const RUNS: usize = 3;

fn main() {
    let env = Env::new();
    let image = debian_image("plain");
    env.write_raw_fleet(&format!(
        "[defaults]\ncpus = 2\nmemory = \"1GiB\"\n\n[images.debian]\nfile = {:?}\n\n[vms.{VM}]\nimage = \"debian\"\ndisk = \"4GiB\"\n",
        image.display().to_string()
    ));
    env.owns(&[VM]);
    env.ok(&["up", VM, "--timeout", "600"]);
    let file = env.dir.path().join("big.bin");
    // Incompressible bytes (xorshift64).
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let data: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&file, &data).unwrap();
    let back = env.dir.path().join("back.bin");
    let (file, back) = (file.to_str().unwrap(), back.to_str().unwrap());
    let guest = format!("{VM}:/root/bench.bin");
    for via in ["ssh", "agent"] {
        let mut to = Vec::new();
        let mut from = Vec::new();
        for _ in 0..RUNS {
            to.push(rate(&env.json(&["cp", "--via", via, file, &guest])));
            from.push(rate(&env.json(&["cp", "--via", via, &guest, back])));
            assert_eq!(std::fs::read(back).unwrap(), data, "the copy differs");
        }
        println!(
            "cp 20 MiB via {via}: to the guest {:.1} MiB/s, from the guest {:.1} MiB/s (median of {RUNS})",
            median(to),
            median(from)
        );
    }
}

fn rate(out: &serde_json::Value) -> f64 {
    out["bytes"].as_f64().unwrap() / f64::from(1 << 20) / out["seconds"].as_f64().unwrap()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}
