//! A Proxmox lab for tests: the in-repo fake PVE (`tests/pve/`) and an agentvm
//! environment whose fleet file has a backend `lab` pointing at it. Include with
//! `#[path = "lab/mod.rs"] mod lab;` after `mod common;` and `mod pve;`.

#![allow(dead_code)]

use std::io::Write;
use std::net::{IpAddr, TcpListener, UdpSocket};

use crate::common::Env;
use crate::pve::{DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET, FakeOptions, FakePve, FakeVm};

/// A VM on the lab backend, with an SSH key of the user's and a purpose.
pub const REMOTE: &str = "[vms.remote]\nbackend = \"lab\"\ncpus = 2\nmemory = \"2GiB\"\ndisk = \"16GiB\"\nuser = \"agent\"\nssh_keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBc+/user= me@laptop\"]\npurpose = \"remote agent\"\n";

/// A port with an SSH banner on every address of this machine, for the
/// backend's ssh_port setting.
pub fn ssh_banner() -> u16 {
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.6 fake-guest\r\n");
        }
    });
    port
}

/// An address of this machine that is neither loopback nor link-local, for a
/// fake guest's agent to report (the banner of [`ssh_banner`] answers on it).
pub fn routable_local_ip() -> IpAddr {
    for probe in ["192.0.2.1:9", "10.255.255.255:9", "198.51.100.1:9"] {
        let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else {
            continue;
        };
        // A UDP connect sends nothing: it only picks the route's source address.
        if socket.connect(probe).is_ok()
            && let Ok(addr) = socket.local_addr()
            && !addr.ip().is_loopback()
            && !addr.ip().is_unspecified()
        {
            return addr.ip();
        }
    }
    panic!("these tests need a network interface with an address that is not loopback");
}

pub struct Lab {
    pub env: Env,
    pub fake: FakePve,
    pub ssh_port: u16,
}

impl Lab {
    /// A lab with `[backends.lab]` on node `pve` (or `node`) and the fleet `vms`.
    pub fn new(opts: FakeOptions, vms: &str) -> Self {
        Self::with_backend(opts, "node = \"pve\"\n", vms)
    }

    /// A lab whose backend has `extra` (TOML lines, including its `node`).
    pub fn with_backend(opts: FakeOptions, extra: &str, vms: &str) -> Self {
        let env = Env::new();
        let fake = FakePve::start(opts);
        let token = env.dir.path().join("pve-token");
        std::fs::write(
            &token,
            format!("{DEFAULT_TOKEN_ID}={DEFAULT_TOKEN_SECRET}\n"),
        )
        .unwrap();
        let lab = Lab {
            env,
            fake,
            ssh_port: ssh_banner(),
        };
        lab.write_fleet(extra, vms);
        lab
    }

    /// Rewrites the fleet file: `[backends.lab]` with `extra` (TOML lines,
    /// including its `node`; a `template` line replaces the default one) and `vms`.
    pub fn write_fleet(&self, extra: &str, vms: &str) {
        let token = self.env.dir.path().join("pve-token");
        let template = if extra.contains("template =") {
            ""
        } else {
            "template = \"nixos-template\"\n"
        };
        self.env.write_raw_fleet(&format!(
            "[backends.lab]\nkind = \"proxmox\"\nendpoint = \"{}\"\n{extra}token = {{ file = {:?} }}\n{template}storage = \"local-lvm\"\npool = \"agents\"\nssh_port = {}\n\n{vms}",
            self.fake.url(),
            token.display().to_string(),
            self.ssh_port,
        ));
    }

    pub fn no_violations(&self) {
        assert_eq!(
            self.fake.violations(),
            Vec::<String>::new(),
            "requests the schema rejects"
        );
    }

    pub fn vm(&self, name: &str) -> (u32, FakeVm) {
        self.fake
            .vms()
            .into_iter()
            .find(|(_, vm)| vm.name == name)
            .unwrap_or_else(|| panic!("no VM {name} on the fake"))
    }

    /// Makes the pool `agents` the backend puts VMs in.
    pub fn create_pool(&self) {
        let (status, _) = crate::pve::raw_call(
            &self.fake.url(),
            "POST",
            "/pools",
            &[("poolid", "agents")],
            Some(&self.fake.auth_header()),
        );
        assert_eq!(status, 200);
    }
}
