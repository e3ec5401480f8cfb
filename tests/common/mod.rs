//! Shared harness for tests that drive the real `agentvm` binary against a real
//! libvirtd (session mode, unprivileged user) and QEMU with the test guest from
//! `images/testguest/build.sh`.

#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub const GUEST_TIMEOUT: &str = "240";

/// Folder with `vmlinuz`, `initrd.img` and `disk.qcow2` of the test guest.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("AGENTVM_TESTGUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/testguest"));
    for file in ["vmlinuz", "initrd.img", "disk.qcow2"] {
        assert!(
            dir.join(file).is_file(),
            "test guest missing: {} (build it with images/testguest/build.sh)",
            dir.join(file).display()
        );
    }
    assert!(
        !nix::unistd::geteuid().is_root(),
        "these tests use qemu:///session, which root does not have: run them as an unprivileged user (see .ci/test)"
    );
    dir
}

/// One test's private agentvm: its own data folder and fleet file.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// VMs to destroy when the test ends, whatever happened.
    cleanup: std::cell::RefCell<Vec<String>>,
    /// The home's own daemon socket, as users get it (no AGENTVM_SOCKET).
    home_socket: bool,
    /// Environment variables every command of this environment gets.
    extra_env: Vec<(String, String)>,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("agentvm-test-")
            .tempdir()
            .unwrap();
        Self {
            dir,
            cleanup: Default::default(),
            home_socket: false,
            extra_env: Vec::new(),
        }
    }

    /// An environment whose daemon socket is chosen by agentvm from the home
    /// (`<runtime dir>/<home key>/agentvm.sock`), not forced by AGENTVM_SOCKET.
    pub fn with_home_socket() -> Self {
        let mut env = Self::new();
        env.home_socket = true;
        env
    }

    /// Gives every command of this environment `key=value`.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.extra_env.push((key.to_string(), value.to_string()));
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// Each test has its own daemon, so tests run side by side like separate users' would.
    pub fn socket(&self) -> PathBuf {
        if self.home_socket {
            return agentvm::paths::socket_path(&agentvm::paths::Home::at(self.home())).unwrap();
        }
        self.dir.path().join("agentvm.sock")
    }

    /// The pid of the daemon holding this environment's pid file, if one does.
    pub fn daemon_pid(&self) -> Option<u32> {
        agentvm::daemon::running_pid(&self.socket())
    }

    pub fn fleet_path(&self) -> PathBuf {
        self.dir.path().join("agentvm.toml")
    }

    /// The test guest image table plus `vms`, as a fleet file.
    pub fn write_fleet(&self, vms: &str) {
        let guest = guest_dir();
        let text = format!(
            "[defaults]\ncpus = 1\nmemory = \"256MiB\"\nimage = \"testguest\"\n\n\
             [images.testguest]\nkernel = {:?}\ninitrd = {:?}\nfile = {:?}\ncmdline = \"console=ttyS0 quiet\"\n\n{vms}",
            guest.join("vmlinuz").display().to_string(),
            guest.join("initrd.img").display().to_string(),
            guest.join("disk.qcow2").display().to_string(),
        );
        std::fs::write(self.fleet_path(), text).unwrap();
    }

    pub fn write_raw_fleet(&self, text: &str) {
        std::fs::write(self.fleet_path(), text).unwrap();
    }

    /// Marks VMs for destruction at the end, and removes leftovers of an earlier run.
    pub fn owns(&self, names: &[&str]) {
        for name in names {
            let _ = self.agentvm(&["destroy", "--yes", name]);
            self.cleanup.borrow_mut().push(name.to_string());
        }
    }

    pub fn agentvm(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running agentvm")
    }

    /// The agentvm command line for this environment, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentvm"));
        cmd.args(args)
            .env("AGENTVM_HOME", self.home())
            .env("AGENTVM_FILE", self.fleet_path())
            .env_remove("AGENTVM_LIBVIRT_URI")
            .env_remove("AGENTVM_ACCEL")
            .env_remove("AGENTVM_FAILPOINT")
            .env_remove("AGENTVM_DAEMON_IDLE_EXIT")
            .current_dir(self.dir.path());
        if self.home_socket {
            cmd.env_remove("AGENTVM_SOCKET");
        } else {
            cmd.env("AGENTVM_SOCKET", self.socket());
        }
        cmd.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts this environment's daemon in the foreground (as a child) and
    /// waits until it answers on its socket.
    pub fn spawn_daemon(&self, extra_env: &[(&str, &str)]) -> DaemonProcess {
        // A daemon started on demand by an earlier command would keep the socket.
        self.ok(&["daemon", "--stop"]);
        let mut cmd = self.command(&["daemon"]);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        std::fs::create_dir_all(self.home()).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home().join("daemon.log"))
            .unwrap();
        let mut child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "daemon exited:\n{}",
                self.daemon_log()
            );
            assert!(std::time::Instant::now() < deadline, "daemon did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the daemon answering is not the one started here:\n{}",
            self.daemon_log()
        );
        DaemonProcess(child)
    }

    /// The daemon's log, for failure messages.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.home().join("daemon.log")).unwrap_or_default()
    }

    /// Runs agentvm and fails the test, with its output, unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.agentvm(args);
        assert!(
            out.status.success(),
            "agentvm {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs agentvm, expects failure, and returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.agentvm(args);
        assert!(
            !out.status.success(),
            "agentvm {args:?} should have failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.push("--json");
        let text = self.ok(&full);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// `status NAME --json`'s one object.
    pub fn status(&self, name: &str) -> Value {
        let all = self.json(&["status", name]);
        all.as_array().unwrap()[0].clone()
    }

    pub fn ssh(&self, name: &str, command: &str) -> String {
        self.ok(&["ssh", name, "--", command])
    }
}

impl Env {
    /// What a failed test leaves to read: the daemon's log and, for each of
    /// its VMs, its logs and whether its QEMU still answers.
    fn print_diagnostics(&self) {
        let tail = |path: &Path, lines: usize| {
            // Lossy: a serial log holds firmware and boot loader bytes too.
            let text = match std::fs::read(path) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(e) => {
                    eprintln!("--- {}: {e}", path.display());
                    return;
                }
            };
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            eprintln!(
                "--- {} ({} lines, last {}):",
                path.display(),
                all.len(),
                all.len() - from
            );
            for line in &all[from..] {
                eprintln!("  {line}");
            }
        };
        // Never waited on for long: libvirt or QEMU may be what hangs.
        let virsh_briefly = |args: &[&str]| {
            Command::new("timeout")
                .args(["10", "virsh", "-c", "qemu:///session"])
                .args(args)
                .output()
        };
        tail(&self.home().join("daemon.log"), 40);
        for name in self.cleanup.borrow().iter() {
            if let Ok(entries) = std::fs::read_dir(self.home().join("vms").join(name)) {
                for entry in entries.flatten() {
                    if entry.path().extension().is_some_and(|e| e == "log") {
                        tail(&entry.path(), 25);
                    }
                }
            }
            tail(&libvirt_domain_log(name), 15);
            // Where the first vCPU is: in the firmware or boot loader (real
            // mode, EIP), or the kernel (RIP, CR0 with paging). Only for a
            // domain libvirt says runs (or is paused).
            let domain = format!("agentvm-{name}");
            let state = virsh_briefly(&["domstate", &domain])
                .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
                .unwrap_or_default();
            eprintln!("--- {name}: domain state: {state:?}");
            if state != "running" && state != "paused" {
                continue;
            }
            for hmp in ["info status", "info cpus", "info registers"] {
                let out = virsh_briefly(&["qemu-monitor-command", &domain, "--hmp", hmp]);
                match out {
                    Ok(out) => {
                        let text = String::from_utf8_lossy(&out.stdout);
                        let lines: Vec<&str> = text
                            .lines()
                            .filter(|l| {
                                hmp != "info registers"
                                    || ["RIP=", "EIP=", "CS =", "CR0="]
                                        .iter()
                                        .any(|p| l.starts_with(p))
                            })
                            .collect();
                        eprintln!(
                            "--- {name}: {hmp} ({}): {} {}",
                            out.status,
                            lines.join("\n  "),
                            String::from_utf8_lossy(&out.stderr).trim()
                        )
                    }
                    Err(e) => eprintln!("--- {name}: {hmp}: {e}"),
                }
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_diagnostics();
        }
        for name in self.cleanup.borrow().iter() {
            let _ = self.agentvm(&["destroy", "--yes", name]);
        }
        let _ = self.agentvm(&["daemon", "--stop"]);
    }
}

/// `(step, status)` of each step of a `deploy --json` or `retire --json` report.
pub fn statuses(report: &Value) -> Vec<(String, String)> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// libvirt's session log of the VM `vm`'s domain (QEMU's command line and
/// what QEMU printed).
pub fn libvirt_domain_log(vm: &str) -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(format!(".cache/libvirt/qemu/log/agentvm-{vm}.log"))
}

/// True when a TCP listener can take 127.0.0.1:`port`.
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

pub fn port_of(status: &Value, key: &str) -> u16 {
    status[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {status}")) as u16
}

/// libvirt's own view, independent of agentvm: is the domain defined?
pub fn domain_exists(vm: &str) -> bool {
    let out = Command::new("virsh")
        .args([
            "-c",
            "qemu:///session",
            "domstate",
            &format!("agentvm-{vm}"),
        ])
        .output()
        .expect("virsh (libvirt-clients) is needed by the tests");
    out.status.success()
}

/// A daemon started by a test; killed (and reaped) when dropped.
pub struct DaemonProcess(std::process::Child);

impl DaemonProcess {
    /// SIGKILL, as `kill -9` would, and wait for it to be gone.
    pub fn kill_now(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// Fails the test with the command's stderr unless it succeeded.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `agentvm events --json` running in the background, its lines collected.
pub struct EventFollower {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Lifecycle states seen so far for the VM followed.
    pub seen: Vec<String>,
    vm: String,
}

impl EventFollower {
    /// Starts following and gives the follower time to subscribe.
    pub fn start(env: &Env, vm: &str) -> Self {
        use std::io::BufRead;
        let mut child = env
            .command(&["events", "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(1500));
        Self {
            child,
            lines,
            seen: Vec::new(),
            vm: vm.to_string(),
        }
    }

    /// Waits (up to 30 s) until the VM has been seen in `state`; returns that event.
    pub fn wait_for(&mut self, state: &str) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let event = self.next_about_vm(deadline, state);
            assert_eq!(event["event"], "lifecycle", "{event}");
            let got = event["state"].as_str().unwrap().to_string();
            self.seen.push(got.clone());
            if got == state {
                return event;
            }
        }
    }

    /// Waits (up to 30 s) for a `problem` event about the VM; returns its text.
    pub fn wait_for_problem(&mut self) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let event = self.next_about_vm(deadline, "problem");
            if event["event"] == "problem" {
                return event["problem"].as_str().unwrap().to_string();
            }
            self.seen.push(event.to_string());
        }
    }

    /// The next event about the VM followed; fails the test, naming `wanted`
    /// and what was seen, once `deadline` passes.
    fn next_about_vm(&mut self, deadline: std::time::Instant, wanted: &str) -> Value {
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no {wanted} event for {}; saw {:?}",
                self.vm,
                self.seen
            );
            let Ok(line) = self
                .lines
                .recv_timeout(std::time::Duration::from_millis(200))
            else {
                continue;
            };
            let event: Value = serde_json::from_str(&line).unwrap();
            if event["vm"] == self.vm.as_str() {
                return event;
            }
        }
    }
}

impl Drop for EventFollower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Debian 12 test guest's qcow2 (`variant` is `plain` or `cloud`):
/// `$AGENTVM_DEBIAN_IMAGE` / `$AGENTVM_DEBIAN_CLOUD_IMAGE` when set (CI builds
/// them first), else what `images/debian/build.sh` prints (from its cache).
pub fn debian_image(variant: &str) -> PathBuf {
    let var = match variant {
        "plain" => "AGENTVM_DEBIAN_IMAGE",
        "cloud" => "AGENTVM_DEBIAN_CLOUD_IMAGE",
        other => panic!("no Debian guest variant {other}"),
    };
    if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{var}={} is not a file", path.display());
        return path;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/debian/build.sh");
    let out = Command::new(&script)
        .args(["--variant", variant])
        .output()
        .expect("running images/debian/build.sh");
    assert!(
        out.status.success(),
        "the Debian {variant} test guest is not built (run .ci/setup, or {} --variant {variant}): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}
