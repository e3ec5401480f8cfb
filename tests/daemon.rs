//! The daemon: one writer, per-VM locks, parallel operations, crash safety and
//! robustness at the socket. Real libvirt (session), QEMU (TCG) and test guest.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use agentvm::failpoint::{DESTROY_STEPS, UP_STEPS};
use common::{Env, EventFollower, GUEST_TIMEOUT, domain_exists, port_of};
use serde_json::Value;

fn defined_count(env: &Env, name: &str) -> usize {
    env.json(&["list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|vm| vm["name"] == name && vm["state"] != "absent")
        .count()
}

#[test]
fn two_concurrent_ups_of_one_vm_make_one_domain_and_one_port_pair() {
    let env = Env::new();
    env.write_fleet("[vms.d-twice]\n");
    env.owns(&["d-twice"]);
    let spawn = || {
        env.command(&["up", "d-twice", "--no-wait", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let mut actions = Vec::new();
    for out in &outs {
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            env.daemon_log()
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        actions.push(v[0]["action"].as_str().unwrap().to_string());
    }
    actions.sort();
    assert_eq!(
        actions,
        ["already-running", "created"],
        "exactly one created it"
    );
    assert_eq!(defined_count(&env, "d-twice"), 1);
    let s = env.status("d-twice");
    assert!(port_of(&s, "ssh_port") != port_of(&s, "spice_port"));
}

#[test]
fn a_busy_vm_waits_or_fails_fast_with_no_block() {
    let env = Env::new();
    env.write_fleet("[vms.d-busy]\n");
    env.owns(&["d-busy"]);
    let _daemon = env.spawn_daemon(&[]);
    // The first `up` holds the VM while it waits for SSH (seconds under TCG).
    let first = env
        .command(&["up", "d-busy", "--timeout", GUEST_TIMEOUT])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let busy = loop {
        let out = env.agentvm(&["up", "d-busy", "--no-wait", "--no-block"]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if stderr.contains("busy: up since") {
            break stderr;
        }
        assert!(Instant::now() < deadline, "never saw the VM busy: {stderr}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!busy.is_empty());
    // A waiting second `up` gets its turn and reports the running VM.
    let second = env.json(&["up", "d-busy", "--timeout", GUEST_TIMEOUT]);
    assert_eq!(second[0]["action"], "already-running");
    assert!(first.wait_with_output().unwrap().status.success());
    env.ok(&["destroy", "--yes", "d-busy"]);
}

#[test]
fn eight_vms_come_up_in_parallel_and_answer_ssh() {
    let env = Env::new();
    let names: Vec<String> = (0..8).map(|i| format!("d-par-{i}")).collect();
    env.write_fleet(
        &names
            .iter()
            .map(|n| format!("[vms.{n}]\n"))
            .collect::<String>(),
    );
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    env.owns(&refs);
    let mut args = vec!["up", "--json", "--timeout", GUEST_TIMEOUT];
    args.extend(&refs);
    let out = env.agentvm(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let up: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(up.as_array().unwrap().len(), 8, "{up}");
    // Eight VMs asked for the image at once; it was imported once.
    let imports = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "bytes-done" && e["label"] == "importing vmlinuz")
        .count();
    assert_eq!(imports, 1, "{stderr}");
    assert_eq!(
        stderr.matches("\"ssh-ready in ").count(),
        8,
        "a ssh-ready event per VM: {stderr}"
    );
    let mut ports = Vec::new();
    for name in &refs {
        assert_eq!(env.ssh(name, "uname -s").trim(), "Linux", "{name}");
        let s = env.status(name);
        ports.push(port_of(&s, "ssh_port"));
        ports.push(port_of(&s, "spice_port"));
    }
    let mut unique = ports.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ports.len(), "ports shared: {ports:?}");
}

#[test]
fn a_daemon_killed_at_any_step_leaves_nothing_the_next_run_cannot_finish() {
    let env = Env::new();
    env.write_fleet("[vms.d-crash]\n");
    env.owns(&["d-crash"]);
    let vm_dir = env.home().join("vms/d-crash");
    for step in UP_STEPS {
        env.ok(&["daemon", "--stop"]);
        let mut cmd = env.command(&["up", "d-crash", "--no-wait"]);
        let out = cmd.env("AGENTVM_FAILPOINT", step).output().unwrap();
        assert!(!out.status.success(), "{step}: up survived its fail-point");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("daemon stopped before answering"),
            "{step}: {stderr}"
        );
        // The next run (a fresh daemon) repairs and finishes.
        let up = env.json(&["up", "d-crash", "--no-wait"]);
        assert!(up[0]["ssh_port"].as_u64().is_some(), "{step}: {up}");
        assert_eq!(defined_count(&env, "d-crash"), 1, "{step}");
        assert!(vm_dir.join("disk.qcow2").is_file(), "{step}");
        env.ok(&["destroy", "--yes", "d-crash"]);
        assert!(!domain_exists("d-crash") && !vm_dir.exists(), "{step}");
    }
    assert!(
        env.daemon_log().contains("repaired: removed"),
        "the disk-created step leaves a folder to repair:\n{}",
        env.daemon_log()
    );
    for step in DESTROY_STEPS {
        env.ok(&["daemon", "--stop"]);
        env.ok(&["up", "d-crash", "--no-wait"]);
        env.ok(&["daemon", "--stop"]);
        let mut cmd = env.command(&["destroy", "--yes", "d-crash"]);
        let out = cmd.env("AGENTVM_FAILPOINT", step).output().unwrap();
        assert!(
            !out.status.success(),
            "{step}: destroy survived its fail-point"
        );
        // The next daemon finishes the job: either by repair at start or by a second destroy.
        let again = env.agentvm(&["destroy", "--yes", "d-crash"]);
        let stderr = String::from_utf8_lossy(&again.stderr);
        assert!(
            again.status.success() || stderr.contains("no VM named"),
            "{step}: {stderr}"
        );
        assert!(!domain_exists("d-crash"), "{step}: domain left");
        assert!(!vm_dir.exists(), "{step}: folder left");
    }
}

#[test]
fn sigkill_of_a_real_daemon_mid_up_recovers() {
    let env = Env::new();
    env.write_fleet("[vms.d-kill]\n");
    env.owns(&["d-kill"]);
    let mut daemon = env.spawn_daemon(&[]);
    let client = env
        .command(&["up", "d-kill", "--timeout", GUEST_TIMEOUT])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill it while the guest boots and the daemon waits for SSH.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !domain_exists("d-kill") {
        assert!(Instant::now() < deadline, "the VM was never defined");
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.kill_now();
    let out = client.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the client must notice the daemon died"
    );
    let up = env.json(&["up", "d-kill", "--timeout", GUEST_TIMEOUT]);
    assert!(up[0]["ssh_ready_seconds"].as_f64().is_some(), "{up}");
    assert!(
        env.daemon_log().contains("replaced the stale socket"),
        "{}",
        env.daemon_log()
    );
    assert_eq!(env.ssh("d-kill", "uname -s").trim(), "Linux");
    assert_eq!(defined_count(&env, "d-kill"), 1);
}

#[test]
fn a_client_that_goes_away_does_not_cancel_the_operation() {
    let env = Env::new();
    env.write_fleet("[vms.d-gone]\n");
    env.owns(&["d-gone"]);
    let _daemon = env.spawn_daemon(&[]);
    let mut client = env
        .command(&["up", "d-gone", "--timeout", GUEST_TIMEOUT])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    client.kill().unwrap();
    client.wait().unwrap();
    // The daemon finishes the `up` anyway; a later `up` waits for it and finds the VM running.
    let up = env.json(&["up", "d-gone", "--timeout", GUEST_TIMEOUT]);
    assert!(
        up[0]["action"] == "already-running" || up[0]["action"] == "created",
        "{up}"
    );
    assert_eq!(env.ssh("d-gone", "uname -s").trim(), "Linux");
    assert_eq!(defined_count(&env, "d-gone"), 1);
}

fn exchange(socket: &std::path::Path, payload: &[u8]) -> Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(payload).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

fn hello_works(socket: &std::path::Path) {
    let payload = format!(
        "{{\"version\":{},\"request\":{{\"op\":\"hello\",\"build\":\"test\"}}}}\n",
        agentvm::protocol::PROTOCOL_VERSION
    );
    let reply = exchange(socket, payload.as_bytes());
    assert_eq!(reply["type"], "hello", "{reply}");
}

#[test]
fn garbage_oversized_and_unknown_requests_get_errors_and_the_daemon_keeps_serving() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let env = Env::new();
    env.write_fleet("");
    let mut daemon = env.spawn_daemon(&[]);
    let socket = env.socket();

    for (payload, expect) in [
        (b"not json\n".to_vec(), "not JSON"),
        (
            b"{\"version\":3,\"request\":{\"op\":\"format-disk\"}}\n".to_vec(),
            "unknown or malformed",
        ),
        (
            b"{\"version\":99,\"request\":{\"op\":\"hello\"}}\n".to_vec(),
            "protocol version 3, the client 99",
        ),
        (
            b"{\"request\":{\"op\":\"hello\"}}\n".to_vec(),
            "no protocol version",
        ),
    ] {
        let reply = exchange(&socket, &payload);
        assert_eq!(reply["type"], "error", "{reply}");
        assert!(
            reply["message"].as_str().unwrap().contains(expect),
            "{reply}"
        );
    }
    let mut huge = vec![b'x'; (1 << 20) + 10];
    huge.push(b'\n');
    let reply = exchange(&socket, &huge);
    assert!(
        reply["message"].as_str().unwrap().contains("larger than"),
        "{reply}"
    );
    hello_works(&socket);

    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    runner
        .run(
            &proptest::collection::vec(any::<u8>(), 1..512),
            |mut bytes| {
                bytes.retain(|&b| b != b'\n');
                bytes.push(b'\n');
                let reply = exchange(&socket, &bytes);
                prop_assert_eq!(&reply["type"], "error");
                Ok(())
            },
        )
        .unwrap();
    hello_works(&socket);
    assert!(daemon.is_running(), "the daemon died");
}

#[test]
fn events_follow_lifecycle_changes() {
    let env = Env::new();
    env.write_fleet("[vms.d-events]\n");
    env.owns(&["d-events"]);
    let _daemon = env.spawn_daemon(&[]);
    let mut events = EventFollower::start(&env, "d-events");
    env.ok(&["up", "d-events", "--no-wait"]);
    events.wait_for("started");
    env.ok(&["down", "--force", "d-events"]);
    events.wait_for("stopped");
    env.ok(&["destroy", "--yes", "d-events"]);
    events.wait_for("undefined");
    let seen = &events.seen;
    assert_eq!(
        seen.first().map(String::as_str),
        Some("defined"),
        "{seen:?}"
    );
}

#[test]
fn install_unit_writes_a_systemd_user_unit() {
    let env = Env::new();
    let config = env.dir.path().join("config");
    let out = env
        .command(&["daemon", "--install-unit"])
        .env("XDG_CONFIG_HOME", &config)
        .output()
        .unwrap();
    common::assert_success(&out);
    let unit = std::fs::read_to_string(config.join("systemd/user/agentvm.service")).unwrap();
    assert!(
        unit.contains(&format!(
            "ExecStart={} daemon",
            env!("CARGO_BIN_EXE_agentvm")
        )),
        "{unit}"
    );
    assert!(unit.contains("[Install]"), "{unit}");
    assert!(
        unit.contains("--idle-exit off"),
        "a service stays up: {unit}"
    );
}
