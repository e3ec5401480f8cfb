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
        }
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
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
        Command::new(env!("CARGO_BIN_EXE_agentvm"))
            .args(args)
            .env("AGENTVM_HOME", self.home())
            .env("AGENTVM_FILE", self.fleet_path())
            .env_remove("AGENTVM_LIBVIRT_URI")
            .env_remove("AGENTVM_ACCEL")
            .current_dir(self.dir.path())
            .output()
            .expect("running agentvm")
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

impl Drop for Env {
    fn drop(&mut self) {
        for name in self.cleanup.borrow().iter() {
            let _ = self.agentvm(&["destroy", "--yes", name]);
        }
    }
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
