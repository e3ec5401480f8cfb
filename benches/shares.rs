//! Benchmark of shared-folder reads on the test guest: a file read through a
//! virtio-fs share beside its floors, the same file read from the guest's own
//! memory and from the host's page cache. Prints figures; asserts nothing about
//! speed. (9p is left out: the test guest's Debian cloud kernel has no 9p.)
//!
//! Run with `.ci/bench` (or `cargo bench --bench shares` as an unprivileged user).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::time::Instant;

use common::{Env, GUEST_TIMEOUT};

const FILE_MIB: usize = 64;
const RUNS: usize = 5;

fn main() {
    let env = Env::new();
    let share = env.dir.path().join("share");
    std::fs::create_dir_all(&share).unwrap();
    let big = share.join("big");
    let mut file = std::fs::File::create(&big).unwrap();
    let mut block = vec![0u8; 1 << 20];
    for i in 0..FILE_MIB {
        block
            .iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = (i * 31 + j * 7) as u8);
        file.write_all(&block).unwrap();
    }
    drop(file);
    env.write_fleet(&format!(
        "[vms.bench-share]\nmemory = \"512MiB\"\nshares = [{{ host = {:?}, guest = \"/work\" }}]\n",
        share.display().to_string()
    ));
    env.owns(&["bench-share"]);
    env.ok(&["up", "bench-share", "--timeout", GUEST_TIMEOUT]);
    let run = |script: &str| {
        let start = Instant::now();
        env.ok(&["exec", "bench-share", "--", "/bin/sh", "-c", script]);
        start.elapsed().as_secs_f64()
    };
    // What an exec costs by itself, taken off every timing below.
    let baseline = median((0..RUNS).map(|_| run("true")).collect());
    let through = |script: &str| {
        let secs = median((0..RUNS).map(|_| run(script)).collect()) - baseline;
        FILE_MIB as f64 / secs.max(1e-6)
    };
    let virtiofs = through("echo 3 > /proc/sys/vm/drop_caches; cat /work/big > /dev/null");
    run("cp /work/big /tmp/big");
    let guest_memory = through("cat /tmp/big > /dev/null");
    let host = {
        let mut times = Vec::new();
        for _ in 0..RUNS {
            let start = Instant::now();
            std::hint::black_box(std::fs::read(&big).unwrap());
            times.push(start.elapsed().as_secs_f64());
        }
        FILE_MIB as f64 / median(times)
    };
    println!(
        "shared folder read of a {FILE_MIB} MiB file, median of {RUNS} (exec overhead {:.0} ms taken off):",
        baseline * 1000.0
    );
    println!("  virtiofs (guest cache dropped) {virtiofs:>8.0} MiB/s");
    println!(
        "  floor: guest memory (tmpfs)    {guest_memory:>8.0} MiB/s  ratio {:.2}",
        virtiofs / guest_memory
    );
    println!(
        "  floor: host page cache         {host:>8.0} MiB/s  ratio {:.2}",
        virtiofs / host
    );
    println!(
        "{}",
        serde_json::json!({"share_read_mib_s": {"virtiofs": virtiofs, "guest_memory": guest_memory, "host": host}})
    );
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}
