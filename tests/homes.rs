//! One daemon per agentvm home, side by side on one libvirt session, each
//! seeing only its own VMs; and a daemon started on demand goes away when idle.
//! These environments use the socket agentvm picks for the home (no
//! AGENTVM_SOCKET), as a user would.

mod common;

use std::time::{Duration, Instant};

use common::{Env, EventFollower};
use serde_json::Value;

/// The names of the VMs `list` shows as existing.
fn existing(env: &Env) -> Vec<String> {
    env.json(&["list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|vm| vm["state"] != "absent")
        .map(|vm| vm["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn two_homes_have_a_daemon_each_and_see_only_their_own_vms() {
    let a = Env::with_home_socket();
    let b = Env::with_home_socket();
    a.write_fleet("[vms.hm-a]\n");
    b.write_fleet("[vms.hm-b]\n[vms.hm-a]\n");
    a.owns(&["hm-a"]);
    b.owns(&["hm-b"]);
    assert_ne!(a.socket(), b.socket());

    let up_a = a.json(&["up", "hm-a", "--no-wait"]);
    let up_b = b.json(&["up", "hm-b", "--no-wait"]);
    let (pid_a, pid_b) = (a.daemon_pid().unwrap(), b.daemon_pid().unwrap());
    assert_ne!(pid_a, pid_b, "one daemon per home");
    assert_eq!(existing(&a), ["hm-a"]);
    assert_eq!(existing(&b), ["hm-b"]);
    // Ports are per user: the homes' VMs never share one.
    assert_ne!(up_a[0]["ssh_port"], up_b[0]["ssh_port"], "{up_a} {up_b}");
    assert_ne!(up_a[0]["spice_port"], up_b[0]["spice_port"]);

    // libvirt's session has one namespace of names: b may not take a's VM.
    let home_a = std::fs::canonicalize(a.home()).unwrap();
    let refused = b.fails(&["up", "hm-a", "--no-wait"]);
    assert!(
        refused.contains(&format!(
            "VM hm-a already exists in agentvm home {}; libvirt's session has one namespace of VM names per user — pick another name",
            home_a.display()
        )),
        "{refused}"
    );
    let refused = b.fails(&["destroy", "--yes", "hm-a"]);
    assert!(
        refused.contains("already exists in agentvm home"),
        "{refused}"
    );
    assert_eq!(a.status("hm-a")["state"], "running", "a's VM is untouched");

    // Both daemons served all along.
    assert_eq!(a.daemon_pid(), Some(pid_a));
    assert_eq!(b.daemon_pid(), Some(pid_b));
    a.ok(&["destroy", "--yes", "hm-a"]);
    b.ok(&["destroy", "--yes", "hm-b"]);
}

/// Waits until no daemon holds `env`'s pid file; false after `limit`.
fn daemon_gone(env: &Env, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while env.daemon_pid().is_some() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

#[test]
fn an_idle_daemon_exits_and_the_next_command_starts_another() {
    let mut env = Env::with_home_socket();
    env.set_env("AGENTVM_DAEMON_IDLE_EXIT", "2s");
    env.write_fleet("");
    env.ok(&["list"]);
    let first = env.daemon_pid().expect("list started a daemon");

    // A client following events keeps it.
    let events = EventFollower::start(&env, "none");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        env.daemon_pid(),
        Some(first),
        "exited under an events client"
    );
    drop(events);

    assert!(daemon_gone(&env, Duration::from_secs(20)), "never exited");
    assert!(!env.socket().exists(), "the socket was left behind");
    let log = env.daemon_log();
    assert!(log.contains("idle for 2s"), "{log}");

    let listed: Value = env.json(&["list"]);
    assert!(listed.is_array());
    let second = env.daemon_pid().expect("list started a new daemon");
    assert_ne!(first, second);
}

#[test]
fn idle_exit_settings_are_checked() {
    let mut env = Env::with_home_socket();
    env.set_env("AGENTVM_DAEMON_IDLE_EXIT", "15 minutes");
    let out = env.command(&["daemon"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("AGENTVM_DAEMON_IDLE_EXIT") && stderr.contains("15m"),
        "{stderr}"
    );
}

/// `agentvm` runs its daemon from the `agentvm-daemon` beside it; installed
/// alone, every verb that needs the daemon says which file is missing and
/// how to install both, instead of failing somewhere later.
#[test]
fn a_cli_without_its_daemon_executable_says_what_is_missing() {
    let env = Env::with_home_socket();
    env.write_raw_fleet("");
    let bin = env.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let alone = bin.join("agentvm");
    std::fs::copy(env!("CARGO_BIN_EXE_agentvm"), &alone).unwrap();
    let out = env.command(&["list"]).output().unwrap();
    assert!(out.status.success(), "with both executables: {out:?}");
    env.ok(&["daemon", "--stop"]);

    let mut cmd = std::process::Command::new(&alone);
    cmd.args(["list"]);
    for (k, v) in env.command(&[]).get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.current_dir(env.dir.path()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&bin.join("agentvm-daemon").display().to_string())
            && stderr.contains("is missing")
            && stderr.contains("install both"),
        "{stderr}"
    );
}
