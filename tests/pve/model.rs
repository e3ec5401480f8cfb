//! What the fake PVE holds and what tests see of it: its options, VMs, tasks, pools, users,
//! tokens, ACLs and the requests it received.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use serde_json::Value;

use super::schema::Schema;
use super::syntax::parse_bool;

/// The token [`FakeOptions::default`] knows, with every privilege.
pub const DEFAULT_TOKEN_ID: &str = "root@pam!agentvm";
pub const DEFAULT_TOKEN_SECRET: &str = "5a0c2d9e-7b41-4f3a-9c6e-2d8b1f0a4e77";

/// Every privilege PVE 9.1 knows (the properties of `GET /access/roles/{roleid}`'s `returns`).
pub fn all_privileges() -> Vec<String> {
    Schema::load()
        .returns("GET", "/access/roles/Administrator")
        .and_then(|r| r.get("properties"))
        .and_then(Value::as_object)
        .expect("schema: GET /access/roles/{roleid} returns the privileges")
        .keys()
        .cloned()
        .collect()
}

#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// The node name (default `pve`).
    pub node: String,
    /// Valid API tokens: (`user@realm!name`, secret, privileges). Default: [`DEFAULT_TOKEN_ID`]
    /// with [`DEFAULT_TOKEN_SECRET`] and [`all_privileges`].
    pub tokens: Vec<(String, String, Vec<String>)>,
    /// The seeded template VM (default 9000, named [`FakeOptions::template_name`]).
    pub template_vmid: u32,
    pub template_name: String,
    /// The storage of the template's disks and the default clone target (default `local-lvm`).
    pub storage: String,
    /// How many status polls of a task answer `running` before it is `stopped` (default 1).
    pub task_polls: u32,
    /// Every task of this type (`qmclone`, `qmstart`, `qmconfig`, `resize`, `qmdestroy`, …) fails
    /// with this exit status, without its effect.
    pub fail_task: Option<(String, String)>,
    /// How many guest-agent calls after each start answer `QEMU guest agent is not running`
    /// (default 2).
    pub agent_down_calls: u32,
    /// The IPv4 address `network-get-interfaces` reports on eth0 (default 127.0.0.1).
    pub guest_ip: String,
    /// The first config update (POST/PUT config) fails with PVE's lock timeout.
    pub lock_timeout_once: bool,
    /// The first `/cluster/nextid` answer is immediately taken by another VM ("someone-else").
    pub nextid_race: bool,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            node: "pve".into(),
            tokens: vec![(
                DEFAULT_TOKEN_ID.into(),
                DEFAULT_TOKEN_SECRET.into(),
                all_privileges(),
            )],
            template_vmid: 9000,
            template_name: "nixos-template".into(),
            storage: "local-lvm".into(),
            task_polls: 1,
            fail_task: None,
            agent_down_calls: 2,
            guest_ip: "127.0.0.1".into(),
            lock_timeout_once: false,
            nextid_race: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeVm {
    pub name: String,
    /// The VM config as PVE stores it (`sshkeys` decoded, `template` = `1` on templates).
    pub config: BTreeMap<String, String>,
    pub running: bool,
    pub template: bool,
    pub pool: Option<String>,
    /// Size of the first disk (`scsi0`/`virtio0`/…).
    pub disk_size_gib: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    /// Below `/api2/json`, percent-decoded.
    pub path: String,
    /// Query and body parameters, decoded (path parameters not included).
    pub params: BTreeMap<String, String>,
    /// `user@realm!name` of a well-formed token header.
    pub token_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeTask {
    pub upid: String,
    /// `qmclone`, `qmstart`, …
    pub kind: String,
    /// The VMID (or other id) the task is about.
    pub id: String,
    /// The token that started it.
    pub user: String,
    /// `OK` or the error.
    pub exitstatus: String,
    pub log: Vec<String>,
    /// Status polls so far.
    pub polls: u32,
    /// A VM locked until the task is seen stopped.
    pub(super) lock_vmid: Option<u32>,
    /// Stopped whatever the polls ([`super::server::FakePve::lose_next_reply`]).
    pub(super) finished: bool,
}

impl FakeTask {
    /// Whether the task still runs: for its first `running_polls` status polls, unless finished.
    pub(super) fn running(&self, running_polls: u32) -> bool {
        !self.finished && self.polls <= running_polls
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FakePool {
    pub comment: Option<String>,
    pub vms: BTreeSet<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeUser {
    pub comment: Option<String>,
    pub enable: bool,
    pub tokens: BTreeMap<String, FakeToken>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeToken {
    pub secret: String,
    pub privsep: bool,
    pub comment: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeAcl {
    pub path: String,
    pub roleid: String,
    /// `user`, `token` or `group`.
    pub kind: String,
    /// The user, token or group id.
    pub ugid: String,
    pub propagate: bool,
}

impl FakeVm {
    pub(super) fn cores(&self) -> u64 {
        self.config
            .get("cores")
            .and_then(|c| c.parse().ok())
            .unwrap_or(1)
    }

    pub(super) fn memory_mib(&self) -> u64 {
        self.config
            .get("memory")
            .map(|m| m.trim_start_matches("current="))
            .and_then(|m| m.split(',').next()?.parse().ok())
            .unwrap_or(512)
    }

    pub(super) fn agent_enabled(&self) -> bool {
        self.config.get("agent").is_some_and(|a| {
            let first = a.split(',').next().unwrap_or("");
            parse_bool(first.trim_start_matches("enabled=")) == Some(true)
        })
    }

    /// A stable digest of the config, 40 hex digits like PVE's SHA-1.
    pub(super) fn digest(&self) -> String {
        let mut out = String::new();
        for seed in 0..3u8 {
            let mut h = DefaultHasher::new();
            seed.hash(&mut h);
            self.config.hash(&mut h);
            out.push_str(&format!("{:016x}", h.finish()));
        }
        out.truncate(40);
        out
    }
}
