//! `fork` end to end against real libvirt (qemu:///session) and QEMU (TCG)
//! with the test guest: copies of a running VM's memory and disk, side by
//! side with it, and the layer they share guarding `destroy`.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use common::{Env, GUEST_TIMEOUT, port_of};

/// Sector 0 of the guest's disk (the test guest's root lives in its
/// initramfs, so raw disk writes show what the disk layers hold).
const DISK_READ: &str = "dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\\000'";

fn disk_write(marker: &str) -> String {
    format!("printf {marker} | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null")
}

fn pinned_key(env: &Env, vm: &str) -> String {
    std::fs::read_to_string(env.home().join("vms").join(vm).join("pinned_host_key"))
        .unwrap_or_else(|e| panic!("{vm} has no pinned host key: {e}"))
}

/// The fork memory files of this test's VMs (`fk-…`) left where a fork
/// writes them: the RAM folders and the VM folders.
fn memory_files_left(env: &Env) -> Vec<PathBuf> {
    let uid = nix::unistd::getuid().as_raw();
    let mut dirs = vec![
        PathBuf::from(format!("/dev/shm/agentvm-{uid}")),
        std::env::temp_dir().join(format!("agentvm-{uid}")),
    ];
    if let Ok(run) = std::env::var("XDG_RUNTIME_DIR") {
        dirs.push(Path::new(&run).join("agentvm"));
    }
    if let Ok(vms) = std::fs::read_dir(env.home().join("vms")) {
        dirs.extend(vms.flatten().map(|vm| vm.path()));
    }
    dirs.iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            name.ends_with("fork-memory.save")
                && (name.starts_with("fk-") || name == "fork-memory.save")
        })
        .collect()
}

#[test]
fn fork_copies_memory_and_disk_and_guards_the_layer() {
    let env = Env::new();
    env.write_fleet("[vms.fk-src]\n");
    // Forks first: the source cannot be destroyed while they sit on its layer.
    env.owns(&["fk-d", "fk-b", "fk-c", "fk-a", "fk-src"]);
    env.ok(&["up", "fk-src", "--timeout", GUEST_TIMEOUT]);

    env.ssh("fk-src", "echo before > /root/f");
    env.ssh("fk-src", &disk_write("disk-before"));

    let forked = env.json(&["fork", "fk-src", "fk-a", "--timeout", GUEST_TIMEOUT]);
    assert_eq!(forked.as_array().unwrap().len(), 1, "{forked}");
    assert_eq!(forked[0]["name"], "fk-a");
    assert!(
        forked[0]["ssh_ready_seconds"].as_f64().is_some(),
        "{forked}"
    );
    assert_eq!(forked[0]["host_key_pinned"], true, "{forked}");

    // After the fork, the source changes memory and disk; the fork does not see it.
    env.ssh("fk-src", "echo after > /root/g");
    env.ssh("fk-src", &disk_write("disk-after"));
    assert_eq!(env.ssh("fk-a", "cat /root/f"), "before\n");
    assert_eq!(
        env.ssh("fk-a", "test -e /root/g && echo yes || echo no"),
        "no\n"
    );
    assert_eq!(env.ssh("fk-a", DISK_READ), "disk-before");
    assert_eq!(env.ssh("fk-src", DISK_READ), "disk-after");
    // And the other way round.
    env.ssh("fk-a", &disk_write("disk-of-a"));
    assert_eq!(env.ssh("fk-src", DISK_READ), "disk-after");
    assert_eq!(env.ssh("fk-a", DISK_READ), "disk-of-a");

    // Side by side, each on its own ports; the fork is a VM like any other.
    let (src, a) = (env.status("fk-src"), env.status("fk-a"));
    assert_eq!(src["state"], "running");
    assert_eq!(a["state"], "running");
    assert_ne!(port_of(&src, "ssh_port"), port_of(&a, "ssh_port"));
    assert_ne!(port_of(&src, "spice_port"), port_of(&a, "spice_port"));
    assert_eq!(port_of(&a, "ssh_port"), port_of(&forked[0], "ssh_port"));
    env.ok(&["ssh", "fk-src", "--", "true"]);
    env.ok(&["ssh", "fk-a", "--", "true"]);
    assert_eq!(pinned_key(&env, "fk-a"), pinned_key(&env, "fk-src"));
    let list = env.json(&["list"]);
    let names: HashSet<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(names.contains("fk-a") && names.contains("fk-src"), "{list}");

    // Two at once, not waiting; then they answer like the first.
    let two = env.json(&["fork", "fk-src", "fk-b", "fk-c", "--no-wait"]);
    let left = memory_files_left(&env);
    assert!(left.is_empty(), "memory snapshots left behind: {left:?}");
    assert_eq!(two.as_array().unwrap().len(), 2, "{two}");
    assert!(two[0]["ssh_ready_seconds"].is_null(), "{two}");
    let ports: HashSet<u64> = [&src, &a, &two[0], &two[1]]
        .iter()
        .map(|v| v["ssh_port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports.len(), 4, "every VM has its own SSH port: {two}");
    for vm in ["fk-b", "fk-c"] {
        env.ok(&["ssh", vm, "--", "true"]);
        assert_eq!(env.ssh(vm, "cat /root/f /root/g"), "before\nafter\n");
        assert_eq!(env.ssh(vm, DISK_READ), "disk-after");
    }

    // A fork of a fork, with a new identity: its own host key, pinned.
    let d = env.json(&[
        "fork",
        "fk-a",
        "fk-d",
        "--new-identity",
        "--timeout",
        GUEST_TIMEOUT,
    ]);
    assert_eq!(d[0]["new_identity"], true, "{d}");
    assert_eq!(d[0]["host_key_pinned"], true, "{d}");
    assert_ne!(pinned_key(&env, "fk-d"), pinned_key(&env, "fk-a"));
    env.ok(&["ssh", "fk-d", "--", "true"]);
    assert_eq!(env.ssh("fk-d", DISK_READ), "disk-of-a");

    // The layers guard destroy: the dependents are named, through forks of forks.
    let refused = env.fails(&["destroy", "--yes", "fk-src"]);
    assert!(
        refused.contains("fk-a, fk-b, fk-c, fk-d forked from it"),
        "{refused}"
    );
    let refused = env.fails(&["destroy", "--yes", "fk-a"]);
    assert!(refused.contains("fk-d forked from it"), "{refused}");
    assert_eq!(env.status("fk-src")["state"], "running");

    // A fork under a taken name is refused.
    let taken = env.fails(&["fork", "fk-src", "fk-b"]);
    assert!(taken.contains("a VM named fk-b already exists"), "{taken}");

    // Forks stop like any VM.
    env.ok(&["down", "fk-d", "--force"]);
    assert_eq!(env.status("fk-d")["state"], "stopped");

    // The source starts again on its own top, above the layers it froze.
    env.ok(&["down", "fk-src", "--force"]);
    env.ok(&["up", "fk-src", "--timeout", GUEST_TIMEOUT]);
    assert_eq!(env.ssh("fk-src", DISK_READ), "disk-after");
    env.ssh("fk-src", &disk_write("disk-restarted"));
    assert_eq!(env.ssh("fk-src", DISK_READ), "disk-restarted");

    // Flattening needs the forks stopped; then the source can go, and they
    // keep their disks.
    let refused = env.fails(&["destroy", "--yes", "--flatten", "fk-src"]);
    assert!(
        refused.contains("stopped: fk-a, fk-b, fk-c (agentvm down fk-a fk-b fk-c)"),
        "{refused}"
    );
    env.ok(&["down", "--force", "fk-a", "fk-b", "fk-c"]);
    env.ok(&["destroy", "--yes", "--flatten", "fk-src"]);
    assert!(!env.home().join("vms").join("fk-src").exists());
    // A stopped fork starts as it was defined, without a [vms.NAME]; a name
    // that is neither in the fleet file nor a VM is refused before any start.
    let typo = env.fails(&["up", "fk-b", "fk-nowhere"]);
    assert!(
        typo.contains("no VM named \"fk-nowhere\"") && typo.contains("no VM of that name exists"),
        "{typo}"
    );
    assert_eq!(
        env.status("fk-b")["state"],
        "stopped",
        "nothing was started"
    );
    let out = env.agentvm(&["up", "fk-b", "--timeout", GUEST_TIMEOUT]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("starting it as it was defined"), "{said}");
    assert_eq!(env.ssh("fk-b", DISK_READ), "disk-after");
    // A stopped fork starts again once the fleet file has it, too.
    env.write_fleet("[vms.fk-a]\n");
    env.ok(&["up", "fk-a", "--timeout", GUEST_TIMEOUT]);
    assert_eq!(env.ssh("fk-a", DISK_READ), "disk-of-a");
    assert_eq!(
        env.ssh("fk-a", "cat /root/f 2>/dev/null || echo gone"),
        "gone\n"
    );
    env.ok(&["destroy", "--yes", "fk-d", "fk-b", "fk-c"]);
    env.ok(&["destroy", "--yes", "fk-a"]);
}

#[test]
fn fork_of_a_missing_or_stopped_vm_is_refused() {
    let env = Env::new();
    env.write_fleet("[vms.fk-stopped]\n");
    env.owns(&["fk-new", "fk-stopped"]);
    let missing = env.fails(&["fork", "fk-nowhere", "fk-new"]);
    assert!(missing.contains("fk-nowhere"), "{missing}");
    env.ok(&["up", "fk-stopped", "--no-wait"]);
    env.ok(&["down", "fk-stopped", "--force"]);
    let stopped = env.fails(&["fork", "fk-stopped", "fk-new"]);
    assert!(stopped.contains("fk-stopped is not running"), "{stopped}");
    assert!(!env.home().join("vms").join("fk-new").exists());
}
