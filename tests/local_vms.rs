//! End to end against real libvirt (qemu:///session) and QEMU (TCG) with the test guest.

mod common;

use std::net::{Ipv4Addr, TcpListener};

use common::{Env, GUEST_TIMEOUT, domain_exists, port_is_free, port_of};

const MARKER: &str = "agentvm-persists-across-restarts";

#[test]
fn up_ssh_persist_down_up_destroy() {
    let env = Env::new();
    env.write_fleet(
        "[vms.e2e-life]\npurpose = \"lifecycle test\"\nenv = { EDITOR = \"vim\", GREETING = \"hello, world\" }\n",
    );
    env.owns(&["e2e-life"]);

    let up = env.json(&["up", "e2e-life", "--timeout", GUEST_TIMEOUT]);
    assert_eq!(up[0]["name"], "e2e-life");
    assert_eq!(up[0]["action"], "created");
    assert!(up[0]["ssh_ready_seconds"].as_f64().is_some(), "{up}");

    let uname = env.ssh("e2e-life", "uname -a");
    assert!(uname.starts_with("Linux "), "{uname}");
    // The env table arrives as the agentvm.env credential (the test guest keeps it in /run).
    assert_eq!(
        env.ssh("e2e-life", "cat /run/agentvm.env"),
        "EDITOR=vim\nGREETING=hello, world\n"
    );

    let status = env.status("e2e-life");
    assert_eq!(status["state"], "running");
    assert_eq!(status["backend"], "local");
    assert_eq!(status["image"], "testguest");
    let ssh_port = port_of(&status, "ssh_port");
    let spice_port = port_of(&status, "spice_port");
    assert!(ssh_port >= 2222 && spice_port >= 5900, "{status}");
    let inventory = env.ok(&["inventory"]);
    assert!(
        inventory.contains(&format!(
            "| e2e-life | local | testguest | 1 | 256MiB | - | {ssh_port} | {spice_port} | running | lifecycle test |"
        )),
        "{inventory}"
    );

    // The guest writes to its disk; the bytes must survive a stop and start.
    env.ssh(
        "e2e-life",
        &format!("printf {MARKER} | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null"),
    );

    let down = env.json(&["down", "e2e-life", "--timeout", "30"]);
    assert_eq!(down[0]["name"], "e2e-life");
    assert_eq!(down[0]["stopped_by"], "agent", "{down}");
    assert_eq!(env.status("e2e-life")["state"], "stopped");

    let again = env.json(&["up", "e2e-life", "--timeout", GUEST_TIMEOUT]);
    assert_eq!(again[0]["action"], "started");
    assert_eq!(port_of(&again[0], "ssh_port"), ssh_port, "ports are stable");
    assert_eq!(port_of(&again[0], "spice_port"), spice_port);
    let read = env.ssh(
        "e2e-life",
        &format!("dd if=/dev/vda bs=1 count={} 2>/dev/null", MARKER.len()),
    );
    assert_eq!(read, MARKER);

    // The other verbs a user reaches for.
    assert_eq!(
        env.ok(&["spice", "e2e-life"]).trim(),
        format!("spice://127.0.0.1:{spice_port}")
    );
    let config = env.ok(&["ssh-config", "e2e-life"]);
    assert!(config.contains("Host agentvm-e2e-life"), "{config}");
    assert!(config.contains(&format!("Port {ssh_port}")), "{config}");
    let console = env.ok(&["console", "e2e-life", "--no-follow"]);
    assert!(console.contains("AGENTVM-TESTGUEST READY"), "{console}");
    let up_again = env.json(&["up", "e2e-life", "--no-wait"]);
    assert_eq!(up_again[0]["action"], "already-running");
    assert_eq!(up_again[0]["restart_needed"], false);

    let vm_dir = env.home().join("vms/e2e-life");
    assert!(vm_dir.join("disk.qcow2").is_file());
    env.ok(&["destroy", "--yes", "e2e-life"]);
    assert!(!domain_exists("e2e-life"), "domain left behind");
    assert!(!vm_dir.exists(), "VM folder left behind");
    assert_eq!(env.status("e2e-life")["state"], "absent");
    assert!(port_is_free(ssh_port) && port_is_free(spice_port));
    let listed = env.json(&["list"]);
    let still_claimed = listed.as_array().unwrap().iter().any(|vm| {
        vm["ssh_port"].as_u64() == Some(ssh_port.into())
            || vm["spice_port"].as_u64() == Some(spice_port.into())
    });
    assert!(
        !still_claimed,
        "ports still claimed after destroy: {listed}"
    );
}

#[test]
fn two_vms_up_at_once_get_distinct_ports() {
    let env = Env::new();
    env.write_fleet("[vms.e2e-pair-a]\n[vms.e2e-pair-b]\n");
    env.owns(&["e2e-pair-a", "e2e-pair-b"]);

    let up = env.json(&["up", "e2e-pair-a", "e2e-pair-b", "--timeout", GUEST_TIMEOUT]);
    assert_eq!(up.as_array().unwrap().len(), 2, "{up}");
    let a = env.status("e2e-pair-a");
    let b = env.status("e2e-pair-b");
    let ports = [
        port_of(&a, "ssh_port"),
        port_of(&a, "spice_port"),
        port_of(&b, "ssh_port"),
        port_of(&b, "spice_port"),
    ];
    for (i, p) in ports.iter().enumerate() {
        assert!(!ports[i + 1..].contains(p), "port {p} shared: {a} {b}");
    }
    for name in ["e2e-pair-a", "e2e-pair-b"] {
        assert_eq!(env.ssh(name, "uname -s").trim(), "Linux");
    }
    // list shows both with every field the contract names.
    let listed = env.json(&["list"]);
    for name in ["e2e-pair-a", "e2e-pair-b"] {
        let row = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {listed}"));
        for key in [
            "name",
            "state",
            "backend",
            "ssh_port",
            "spice_port",
            "image",
        ] {
            assert!(row.get(key).is_some(), "{key} missing in {row}");
        }
        assert_eq!(row["state"], "running");
    }
}

#[test]
fn a_port_held_by_another_process_is_skipped_and_a_pinned_one_is_an_error() {
    let env = Env::new();
    // Hold every free port at the bottom of the SSH range.
    let held: Vec<(u16, TcpListener)> = (2222..2262)
        .filter_map(|p| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, p))
                .ok()
                .map(|l| (p, l))
        })
        .collect();
    assert!(!held.is_empty());
    let pinned = held[0].0;
    env.write_fleet(&format!(
        "[vms.e2e-skip]\n\n[vms.e2e-pin]\nssh_port = {pinned}\n"
    ));
    env.owns(&["e2e-skip", "e2e-pin"]);

    let up = env.json(&["up", "e2e-skip", "--no-wait"]);
    let port = port_of(&up[0], "ssh_port");
    assert!(
        !held.iter().any(|(p, _)| *p == port),
        "got port {port}, which this test holds"
    );

    let err = env.fails(&["up", "e2e-pin", "--no-wait"]);
    assert!(
        err.contains(&format!("ssh port {pinned} is already in use")),
        "{err}"
    );
    let me = std::fs::read_to_string("/proc/self/comm").unwrap();
    assert!(err.contains(me.trim()), "the holder is named: {err}");
    assert!(!domain_exists("e2e-pin"));
    assert!(!env.home().join("vms/e2e-pin").exists());
    drop(held);
}

#[test]
fn hostile_names_and_specs_create_nothing() {
    let env = Env::new();
    let guest = common::guest_dir();
    let image = format!(
        "[images.testguest]\nkernel = {:?}\ninitrd = {:?}\nfile = {:?}\n",
        guest.join("vmlinuz").display().to_string(),
        guest.join("initrd.img").display().to_string(),
        guest.join("disk.qcow2").display().to_string()
    );
    let cases = [
        (
            "[vms.\"../../evil\"]\nimage = \"testguest\"\n",
            "invalid name",
            "vms.../../evil",
        ),
        (
            "[vms.e2e-x]\nimage = \"testguest\"\nmemory = \"12XB\"\n",
            "unknown unit",
            "vms.e2e-x.memory",
        ),
        (
            "[vms.e2e-x]\nimage = \"testguest\"\nrm_rf = true\n",
            "unknown field",
            "vms.e2e-x.rm_rf",
        ),
        (
            "[vms.e2e-x]\nimage = \"testguest\"\ncpus = \"lots\"\n",
            "invalid type",
            "vms.e2e-x.cpus",
        ),
        (
            "[vms.e2e-x]\nimage = \"testguest\"\ndisk = \"1MiB\"\n",
            "smaller than image",
            "",
        ),
    ];
    for (vms, message, field) in cases {
        env.write_raw_fleet(&format!("{image}\n{vms}"));
        let err = env.fails(&["up", "e2e-x"]);
        assert!(err.contains(message), "{vms}: {err}");
        assert!(err.contains(field), "{vms}: {err}");
        if !field.is_empty() {
            assert!(err.contains("agentvm.toml:"), "names the file: {err}");
        }
        assert!(!domain_exists("e2e-x"), "{vms}: domain created");
        let vms_dir = env.home().join("vms");
        let leftovers = std::fs::read_dir(&vms_dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(leftovers, 0, "{vms}: files left in {}", vms_dir.display());
    }
    // A hostile purpose is stored escaped, not interpreted.
    env.write_raw_fleet(&format!(
        "{image}\n[vms.e2e-xml]\nimage = \"testguest\"\npurpose = \"</agentvm:purpose></agentvm:vm></metadata><devices><hostdev mode='subsystem'/></devices>\"\n"
    ));
    env.owns(&["e2e-xml"]);
    env.ok(&["up", "e2e-xml", "--no-wait"]);
    let status = env.status("e2e-xml");
    assert!(
        status["purpose"].as_str().unwrap().contains("<hostdev"),
        "{status}"
    );
    let dumped = std::process::Command::new("virsh")
        .args(["-c", "qemu:///session", "dumpxml", "agentvm-e2e-xml"])
        .output()
        .unwrap();
    let dumped = String::from_utf8_lossy(&dumped.stdout);
    assert!(!dumped.contains("<hostdev"), "{dumped}");
}

#[test]
fn readonly_vms_refuse_down_destroy_and_redefinition() {
    let env = Env::new();
    let vm = |extra: &str| format!("[vms.e2e-ro]\n{extra}\n");
    env.write_fleet(&vm("readonly = false"));
    env.owns(&["e2e-ro"]);
    env.ok(&["up", "e2e-ro", "--no-wait"]);

    env.write_fleet(&vm("readonly = true"));
    let up = env.json(&["up", "e2e-ro", "--no-wait"]);
    assert_eq!(
        up[0]["restart_needed"], false,
        "readonly does not change the machine: {up}"
    );
    let err = env.fails(&["down", "e2e-ro"]);
    assert!(err.contains("readonly"), "{err}");
    let err = env.fails(&["down", "--force", "e2e-ro"]);
    assert!(err.contains("readonly"), "{err}");
    let err = env.fails(&["destroy", "--yes", "e2e-ro"]);
    assert!(err.contains("readonly"), "{err}");
    assert!(domain_exists("e2e-ro"));
    assert_eq!(env.status("e2e-ro")["state"], "running");

    env.write_fleet(&vm("readonly = false"));
    env.ok(&["down", "--force", "e2e-ro"]);
    env.write_fleet(&vm("readonly = true\nmemory = \"320MiB\""));
    let err = env.fails(&["up", "e2e-ro", "--no-wait"]);
    assert!(
        err.contains("readonly") && err.contains("redefine"),
        "{err}"
    );
    assert_eq!(env.status("e2e-ro")["state"], "stopped");

    // Without readonly the changed spec is applied by redefining.
    env.write_fleet(&vm("memory = \"320MiB\""));
    let up = env.json(&["up", "e2e-ro", "--no-wait"]);
    assert_eq!(up[0]["action"], "redefined");
    env.ok(&["destroy", "--yes", "e2e-ro"]);
    assert!(!domain_exists("e2e-ro"));
}

#[test]
fn destroy_without_yes_off_a_terminal_refuses() {
    let env = Env::new();
    env.write_fleet("[vms.e2e-ask]\n");
    env.owns(&["e2e-ask"]);
    env.ok(&["up", "e2e-ask", "--no-wait"]);
    let err = env.fails(&["destroy", "e2e-ask"]);
    assert!(err.contains("--yes"), "{err}");
    assert!(domain_exists("e2e-ask"));
}

#[test]
fn the_longest_name_boots() {
    // 31 characters: socket paths derived from the name must stay within the
    // UNIX socket limit whatever the home folder is.
    let name = "e2e-longest-name-for-the-socket";
    assert_eq!(name.len(), 31);
    let env = Env::new();
    env.write_fleet(&format!("[vms.{name}]\n"));
    env.owns(&[name]);
    env.ok(&["up", name, "--timeout", GUEST_TIMEOUT]);
    assert_eq!(env.ssh(name, "uname -s").trim(), "Linux");
}
