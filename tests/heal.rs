//! The daemon outlives libvirtd: killed or restarted under it, libvirtd is
//! reconnected to on the next request, and no verb reports libvirt's transport
//! errors. Real libvirt (session), QEMU (TCG) and the test guest.
//!
//! The test runs its own session libvirtd (private XDG folders), so killing it
//! disturbs no other test of the same user.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{Env, EventFollower, GUEST_TIMEOUT};

/// What libvirt says when its connection is gone; never shown to a user.
const TRANSPORT_ERRORS: &[&str] = &[
    "client socket is closed",
    "Broken pipe",
    "End of file while reading data",
];

/// A session libvirtd of this test's own: XDG folders under `root`.
struct PrivateLibvirt {
    root: PathBuf,
}

impl PrivateLibvirt {
    fn new(env: &mut Env) -> Self {
        // Short names: QEMU's monitor socket lives under XDG_CONFIG_HOME.
        let root = env.dir.path().join("x");
        for dir in ["run", "cfg", "cache"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("run"), std::fs::Permissions::from_mode(0o700)).unwrap();
        env.set_env("XDG_RUNTIME_DIR", root.join("run").to_str().unwrap());
        env.set_env("XDG_CONFIG_HOME", root.join("cfg").to_str().unwrap());
        env.set_env("XDG_CACHE_HOME", root.join("cache").to_str().unwrap());
        Self { root }
    }

    /// The running libvirtd's pid, from its pid file.
    fn pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.root.join("run/libvirt/libvirtd.pid")).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }

    /// Sends `signal` to libvirtd and waits until it is gone.
    fn stop(&self, signal: nix::sys::signal::Signal) {
        let pid = self.pid().expect("the private libvirtd is running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(pid) {
            assert!(Instant::now() < deadline, "libvirtd {pid} did not go away");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PrivateLibvirt {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

/// A libvirtd process (not a zombie, not another program) with this pid.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.contains("(libvirtd)") && !stat.contains(") Z "))
}

/// Runs agentvm; asserts success and that no transport error shows.
fn run_ok(env: &Env, args: &[&str]) -> String {
    let out = env.agentvm(args);
    assert_clean(args, &out);
    assert!(
        out.status.success(),
        "agentvm {args:?} failed:\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.daemon_log()
    );
    String::from_utf8(out.stdout).unwrap()
}

fn assert_clean(args: &[&str], out: &Output) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for bad in TRANSPORT_ERRORS {
        assert!(
            !text.contains(bad),
            "agentvm {args:?} said {bad:?}:\n{text}"
        );
    }
}

fn state_of(env: &Env, name: &str) -> String {
    let text = run_ok(env, &["status", name, "--json"]);
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    all[0]["state"].as_str().unwrap().to_string()
}

fn listed(env: &Env, name: &str) -> bool {
    let text = run_ok(env, &["list", "--json"]);
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .any(|vm| vm["name"] == name && vm["state"] != "absent")
}

fn daemon_pid_file(env: &Env) -> String {
    std::fs::read_to_string(env.socket().with_extension("pid"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn the_daemon_reconnects_after_libvirtd_is_killed_or_restarted() {
    let mut env = Env::new();
    let libvirt = PrivateLibvirt::new(&mut env);
    // Pinned ports: this libvirt does not see the other tests' VMs.
    env.write_fleet("[vms.h-heal]\nssh_port = 2791\nspice_port = 5791\n");
    env.owns(&["h-heal"]);
    let mut daemon = env.spawn_daemon(&[]);
    let pid = daemon.id().to_string();
    run_ok(&env, &["up", "h-heal", "--timeout", GUEST_TIMEOUT]);
    let mut events = EventFollower::start(&env, "h-heal");

    // Killed under a running VM: the next verbs reconnect (a new libvirtd
    // is spawned for qemu:///session) and succeed. (The daemon's lifecycle
    // watcher may reconnect first, so a new libvirtd can be there at once.)
    let killed = libvirt.pid().expect("the private libvirtd is running");
    libvirt.stop(nix::sys::signal::Signal::SIGKILL);
    run_ok(&env, &["down", "h-heal", "--timeout", "120"]);
    assert!(
        libvirt.pid().is_some_and(|pid| pid != killed),
        "no new libvirtd was spawned"
    );
    // The lifecycle watcher polls the new connection too.
    events.wait_for("stopped");
    assert_eq!(state_of(&env, "h-heal"), "stopped");
    run_ok(&env, &["up", "h-heal", "--timeout", GUEST_TIMEOUT]);
    assert_eq!(state_of(&env, "h-heal"), "running");
    assert!(listed(&env, "h-heal"));

    // Restarted while idle: the VM keeps running, and status and list see it.
    libvirt.stop(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(state_of(&env, "h-heal"), "running");
    assert!(listed(&env, "h-heal"));
    run_ok(&env, &["down", "--force", "h-heal"]);
    events.wait_for("stopped");

    assert!(daemon.is_running(), "the daemon died");
    assert_eq!(
        daemon_pid_file(&env),
        pid,
        "the same daemon served throughout"
    );
    let log = env.daemon_log();
    assert!(log.contains("reconnected to libvirt"), "{log}");
    drop(events);
    run_ok(&env, &["destroy", "--yes", "h-heal"]);
}
