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
    /// The node the API is served from, and the first node of the cluster (default `pve`).
    pub node: String,
    /// The cluster's nodes. A node named [`FakeOptions::node`] is added in front when missing
    /// (so the default is that one node alone, online, with [`FakeNode::new`]'s memory).
    pub nodes: Vec<FakeNode>,
    /// The storages, defined on every node (see [`FakeStorage`]). Empty means
    /// [`FakeStorage::defaults`]; a storage named [`FakeOptions::storage`] is added when missing.
    pub storages: Vec<FakeStorage>,
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
    /// `agent/file-read` and `agent/file-write` use this host's files, as `agent/exec` runs on
    /// this host, instead of the guests' in-memory files: exec and file calls see one file system.
    pub files_on_host: bool,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            node: "pve".into(),
            nodes: Vec::new(),
            storages: Vec::new(),
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
            files_on_host: false,
        }
    }
}

/// A cluster node. The API is served from [`FakeOptions::node`]; requests for another node are
/// answered as if pveproxy had proxied them there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeNode {
    pub name: String,
    /// An offline node's requests fail like PVE's proxy does (HTTP 595, "No route to host").
    pub online: bool,
    /// Memory in bytes, and the part in use.
    pub maxmem: u64,
    pub mem: u64,
}

impl FakeNode {
    /// An online node with 24 GiB, 2 GiB of it used.
    pub fn new(name: &str) -> FakeNode {
        FakeNode {
            name: name.to_string(),
            online: true,
            maxmem: 24 << 30,
            mem: 2 << 30,
        }
    }
}

/// A storage as `storage.cfg` defines it; it exists on every node, with separate volumes per
/// node unless `shared`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeStorage {
    pub name: String,
    /// The plugin type: `dir`, `lvmthin`, `nfs`, …
    pub kind: String,
    /// Allowed content types: `images`, `rootdir`, `iso`, `vztmpl`, `backup`, `import`, …
    pub content: Vec<String>,
    pub shared: bool,
    /// Free bytes (what PVE reports as `avail`).
    pub avail: u64,
}

impl FakeStorage {
    pub fn new(name: &str, kind: &str, content: &[&str], shared: bool) -> FakeStorage {
        FakeStorage {
            name: name.to_string(),
            kind: kind.to_string(),
            content: content.iter().map(|c| c.to_string()).collect(),
            shared,
            avail: 100 << 30,
        }
    }

    /// `local` (dir: `iso,vztmpl,backup,import`) and `storage` (lvmthin: `images,rootdir`).
    pub fn defaults(storage: &str) -> Vec<FakeStorage> {
        vec![
            FakeStorage::new(
                "local",
                "dir",
                &["iso", "vztmpl", "backup", "import"],
                false,
            ),
            FakeStorage::new(storage, "lvmthin", &["images", "rootdir"], false),
        ]
    }

    pub fn allows(&self, content: &str) -> bool {
        self.content.iter().any(|c| c == content)
    }

    /// Whether the storage keeps files in a directory (uploads need one).
    pub fn has_path(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "dir" | "nfs" | "cifs" | "cephfs" | "glusterfs" | "btrfs"
        )
    }

    /// Where PVE keeps the storage's files (`dir` `local` is `/var/lib/vz`).
    pub fn path(&self) -> String {
        if self.name == "local" {
            "/var/lib/vz".to_string()
        } else {
            format!("/mnt/pve/{}", self.name)
        }
    }
}

/// A VM snapshot as qemu-server keeps it in the config's `[snapname]` section.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FakeSnapshot {
    /// The VM config when it was taken (without `lock`, `digest`, `description`, …).
    pub config: BTreeMap<String, String>,
    pub snaptime: u64,
    /// RAM saved (taken with `vmstate=1` while running).
    pub vmstate: bool,
    pub description: Option<String>,
    pub parent: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FakeVm {
    pub name: String,
    /// The node the VM is on; empty in [`FakePve::put_vm`](super::server::FakePve::put_vm)
    /// means the first node.
    pub node: String,
    /// Snapshots by name (the current config's `parent` key names the newest one).
    pub snapshots: BTreeMap<String, FakeSnapshot>,
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
