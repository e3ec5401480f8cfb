//! Benchmark of booting the Debian 12 guest (`images/debian`, plain variant)
//! directly, without a boot loader, against booting the same qcow2 through its
//! GRUB, in the same run:
//!
//! - `[images.grub]`: `file` only; SeaBIOS loads GRUB from the MBR, which
//!   loads the kernel and initrd from the ext4 root;
//! - `[images.direct]`: the kernel, initrd and command line that `build.sh`
//!   copies out beside the qcow2 (`.vmlinuz`, `.initrd.img`, `.cmdline`, the
//!   line GRUB passes) plus the same `file`; QEMU loads the kernel itself.
//!
//! Each run destroys the VM and times `up --timeout 600 --json` (a first boot
//! on a fresh overlay, so both grow the root file system and make their host
//! key), reading its `ssh_ready_seconds` and the command's wall clock. Runs
//! alternate between the two images to spread the host's noise. The GRUB
//! median is printed as the floor column: it is a comparison, not a floor.
//!
//! Needs `$AGENTVM_DEBIAN_IMAGE` (the plain qcow2; `.ci/bench boot` builds it);
//! without it the bench says so and does nothing. Asserts nothing about speed.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::Env;
use support::{Figure, median};

const RUNS: usize = 3;
/// TCG boots of a full distribution take a while.
const BOOT_TIMEOUT: &str = "600";
const GRUB: &str = "bench-boot-grub";
const DIRECT: &str = "bench-boot-direct";

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let Some(image) = std::env::var_os("AGENTVM_DEBIAN_IMAGE").filter(|v| !v.is_empty()) else {
        println!(
            "boot: skipped, AGENTVM_DEBIAN_IMAGE is not set (the plain Debian guest's qcow2 from \
             images/debian/build.sh; `.ci/bench boot` builds it and sets it)"
        );
        return;
    };
    let image = PathBuf::from(image);
    assert!(
        image.is_file(),
        "AGENTVM_DEBIAN_IMAGE={} is not a file",
        image.display()
    );
    let kernel = beside(&image, "vmlinuz");
    let initrd = beside(&image, "initrd.img");
    let cmdline = std::fs::read_to_string(beside(&image, "cmdline")).unwrap();
    let cmdline = cmdline.trim();

    let env = Env::new();
    let file = image.display().to_string();
    env.write_raw_fleet(&format!(
        "[defaults]\ncpus = 2\nmemory = \"1GiB\"\n\n\
         [images.grub]\nfile = {file:?}\n\n\
         [images.direct]\nkernel = {:?}\ninitrd = {:?}\ncmdline = {cmdline:?}\nfile = {file:?}\n\n\
         [vms.{GRUB}]\nimage = \"grub\"\n\n\
         [vms.{DIRECT}]\nimage = \"direct\"\n",
        kernel.display().to_string(),
        initrd.display().to_string(),
    ));
    env.owns(&[GRUB, DIRECT]);

    // Import both images first (up without waiting for the boot), so no timed
    // run includes an import.
    for vm in [GRUB, DIRECT] {
        env.ok(&["up", vm, "--no-wait"]);
        env.ok(&["destroy", "--yes", vm]);
    }

    let (mut grub_ready, mut grub_wall) = (Vec::new(), Vec::new());
    let (mut direct_ready, mut direct_wall) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        // Alternate which goes first, so neither always follows the other.
        let order = if run % 2 == 0 {
            [GRUB, DIRECT]
        } else {
            [DIRECT, GRUB]
        };
        for vm in order {
            let (ready, wall) = boot(&env, vm);
            println!(
                "  run {}: {vm}: up -> SSH-ready {ready:.1} s, wall {wall:.1} s",
                run + 1
            );
            if vm == GRUB {
                grub_ready.push(ready);
                grub_wall.push(wall);
            } else {
                direct_ready.push(ready);
                direct_wall.push(wall);
            }
        }
    }
    let (grub_ready, grub_wall) = (median(grub_ready), median(grub_wall));
    let (direct_ready, direct_wall) = (median(direct_ready), median(direct_wall));
    println!("Debian 12 plain, first boot, median of {RUNS}:");
    println!("  GRUB:   up -> SSH-ready {grub_ready:.1} s, wall {grub_wall:.1} s");
    println!("  direct: up -> SSH-ready {direct_ready:.1} s, wall {direct_wall:.1} s");
    support::report(
        "Debian guest booted directly vs. through GRUB (TCG), median seconds:",
        &[
            Figure {
                name: "Debian direct boot, up to SSH-ready",
                unit: "s",
                agentvm: direct_ready,
                floor: grub_ready,
                floor_is: "the same image through its GRUB (a comparison, not a floor)",
                target: None,
            },
            Figure {
                name: "Debian direct boot, `up` wall clock",
                unit: "s",
                agentvm: direct_wall,
                floor: grub_wall,
                floor_is: "the same image through its GRUB (a comparison, not a floor)",
                target: None,
            },
        ],
    );
}

/// `<image without .qcow2>.<ext>`, which `images/debian/build.sh` writes
/// beside the qcow2.
fn beside(image: &Path, ext: &str) -> PathBuf {
    let path = image.with_extension(ext);
    assert!(
        path.is_file(),
        "{} is missing: rebuild the image with images/debian/build.sh, which writes it",
        path.display()
    );
    path
}

/// Destroys `vm` and brings it up until SSH answers: (`ssh_ready_seconds`,
/// wall clock of `up`).
fn boot(env: &Env, vm: &str) -> (f64, f64) {
    // Normally already gone (destroying a missing VM fails).
    let _ = env.agentvm(&["destroy", "--yes", vm]);
    let start = Instant::now();
    let up = env.json(&["up", vm, "--timeout", BOOT_TIMEOUT]);
    let wall = start.elapsed().as_secs_f64();
    let ready = up[0]["ssh_ready_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no ssh_ready_seconds in {up}"));
    env.ok(&["destroy", "--yes", vm]);
    (ready, wall)
}
