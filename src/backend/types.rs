//! What backends report: VM states and statuses, plans, the outcomes of
//! operations. Every type crosses the daemon socket as JSON.

use std::any::Any;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The lifecycle state shown by `list` and `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Stopped,
    Crashed,
    Absent,
    /// The backend cannot tell: the VM's Proxmox node is offline.
    Unknown,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Crashed => "crashed",
            Self::Absent => "absent",
            Self::Unknown => "unknown",
        }
    }
}

/// What `status` says of a VM's guest agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    Ready,
    NotResponding,
    /// The image has no guest agent (`agent = false`).
    Disabled,
    Stopped,
}

/// What a backend knows about one of its VMs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub state: State,
    pub backend: String,
    pub ssh_port: Option<u16>,
    pub spice_port: Option<u16>,
    pub image: Option<String>,
    pub readonly: bool,
    /// The spec changed while the VM ran: a restart applies it.
    pub restart_needed: bool,
    /// Present in the fleet file (false for VMs left from an older spec).
    pub in_spec: bool,
    pub purpose: Option<String>,
    /// The guest's addresses from its agent (loopback and link-local left out).
    pub ips: Vec<String>,
    pub agent: AgentState,
    /// The names of the variables in the VM's env; never their values.
    pub env: Vec<String>,
    /// Whether the env has reached the guest (`None`: no env, or the VM is stopped).
    #[serde(default)]
    pub env_delivery: Option<EnvDelivery>,
    /// The cluster node the VM is on (Proxmox).
    #[serde(default)]
    pub node: Option<String>,
    /// Host ports forwarded into the guest (local VMs).
    #[serde(default)]
    pub forwards: Vec<ForwardStatus>,
    /// Host folders shared with the guest (local VMs).
    #[serde(default)]
    pub shares: Vec<ShareStatus>,
    /// What the guest may reach outside (`open` unless the spec says).
    #[serde(default)]
    pub egress: crate::spec::Egress,
    /// The egress proxy's tunnel into the guest (`up since …`, `connecting`,
    /// `down: …`), filled in by the daemon for VMs with an allow list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_tunnel: Option<String>,
}

/// One shared folder of a VM, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareStatus {
    pub host: std::path::PathBuf,
    pub guest: String,
    #[serde(rename = "type")]
    pub kind: crate::spec::ShareKind,
    pub readonly: bool,
    /// The mount tag the guest mounts it by.
    pub tag: String,
    /// Whether its virtiofsd runs (`None` for 9p, which QEMU serves).
    pub server_running: Option<bool>,
    /// What is wrong and how to fix it (a running VM whose virtiofsd died).
    #[serde(default)]
    pub problem: Option<String>,
}

/// One port forward of a VM, as `status` and `forward` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardStatus {
    pub host_addr: std::net::IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
    /// Added to the running VM by `agentvm forward`: gone at its next start.
    #[serde(default)]
    pub live: bool,
}

impl ForwardStatus {
    pub fn new(forward: &crate::spec::Forward, live: bool) -> Self {
        Self {
            host_addr: forward.host_addr,
            host_port: forward.host_port,
            guest_port: forward.guest_port,
            live,
        }
    }

    pub fn forward(&self) -> crate::spec::Forward {
        crate::spec::Forward {
            host_addr: self.host_addr,
            host_port: self.host_port,
            guest_port: self.guest_port,
        }
    }
}

/// What `agentvm forward` does to a running VM's forwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "kebab-case")]
pub enum ForwardChange {
    List,
    Add {
        forward: crate::spec::Forward,
    },
    /// Removes the live forward on this host port.
    Remove {
        host_port: u16,
    },
}

/// Where a running VM's env is: local VMs get it at start (fw_cfg); Proxmox
/// VMs through the guest agent once it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnvDelivery {
    /// Not written yet: the guest agent has not answered since the start.
    Pending,
    Delivered,
    /// Writing it failed; `up` said why, and the next `up` tries again.
    Failed,
}

impl VmStatus {
    /// A VM of the fleet file that no backend has.
    pub fn absent(name: &str, backend: &str, spec: Option<&crate::spec::VmSpec>) -> Self {
        Self {
            name: name.to_string(),
            state: State::Absent,
            backend: backend.to_string(),
            ssh_port: None,
            spice_port: None,
            image: spec.and_then(|s| s.image.as_ref()).map(ToString::to_string),
            readonly: spec.is_some_and(|s| s.readonly),
            restart_needed: false,
            in_spec: spec.is_some(),
            purpose: spec.and_then(|s| s.purpose.clone()),
            ips: Vec::new(),
            agent: AgentState::Stopped,
            env: spec.map(env_names).unwrap_or_default(),
            env_delivery: None,
            node: None,
            forwards: spec
                .map(|s| {
                    s.forwards
                        .iter()
                        .map(|f| ForwardStatus::new(f, false))
                        .collect()
                })
                .unwrap_or_default(),
            shares: spec
                .map(|s| {
                    s.shares
                        .iter()
                        .enumerate()
                        .map(|(i, share)| ShareStatus {
                            host: share.host.clone(),
                            guest: share.guest.clone(),
                            kind: share.kind,
                            readonly: share.readonly,
                            tag: crate::spec::Share::tag(i),
                            server_running: None,
                            problem: None,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            egress: spec.map(|s| s.egress.clone()).unwrap_or_default(),
            egress_tunnel: None,
        }
    }
}

/// The names a spec's env will have: its `env` keys and its `pass_env` names.
pub fn env_names(spec: &crate::spec::VmSpec) -> Vec<String> {
    let mut names: Vec<String> = spec.env.keys().chain(&spec.pass_env).cloned().collect();
    names.sort();
    names.dedup();
    names
}

/// A VM a backend has, as the orchestration needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub running: bool,
    /// The hash of the spec it was made or last changed with.
    pub spec_hash: String,
    /// Readonly as recorded on the backend (the spec, when there is one, wins).
    pub readonly: bool,
    pub ssh_port: Option<u16>,
    pub spice_port: Option<u16>,
    /// The egress policy it was defined with.
    pub egress: crate::spec::Egress,
}

/// What `prepare` made ready for `create`/`reconfigure`: the hash the VM's spec
/// has on this backend, and whatever else the backend needs (its own type).
pub struct Prepared {
    pub spec_hash: String,
    data: Box<dyn Any + Send + Sync>,
}

impl Prepared {
    pub fn new(spec_hash: String, data: impl Any + Send + Sync) -> Self {
        Self {
            spec_hash,
            data: Box::new(data),
        }
    }

    /// The backend's own part; a backend handed another's `Prepared` is a bug.
    pub fn data<T: 'static>(&self) -> &T {
        self.data
            .downcast_ref()
            .expect("a backend receives the Prepared it made")
    }
}

/// What `up` would do to one VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub backend: String,
    /// The VM does not exist yet and would be created.
    pub create: bool,
    /// Settings that would change: key, old value (`None` when new), new value.
    pub changes: Vec<Change>,
    /// The disk would grow to this size.
    pub resize: Option<String>,
    /// The VM would be started.
    pub start: bool,
    /// It runs with an older spec: a restart would apply the changes.
    pub restart_needed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub key: String,
    pub old: Option<String>,
    pub new: String,
}

impl Change {
    pub fn new(key: &str, old: Option<String>, new: String) -> Self {
        Self {
            key: key.to_string(),
            old,
            new,
        }
    }
}

/// The `PATH` of commands `exec` runs: NixOS's profile first, then the usual
/// FHS folders.
pub const EXEC_PATH: &str = "PATH=/run/wrappers/bin:/run/current-system/sw/bin:\
/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Which output stream of a guest command bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a command run in the guest ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecOutcome {
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
}

/// A VM's SSH host key, as pinned into its known_hosts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostKey {
    /// `ssh-ed25519 AAAA…`
    pub key: String,
    /// `agent` (read from the guest's file) or `ssh-keyscan` (the agent was missing).
    pub source: String,
    pub known_hosts: PathBuf,
}

/// The name `snapshot create` gives when none is given: `snap-` and the time
/// (`snap-20261203T040000Z`), valid on libvirt and as a Proxmox snapshot name.
pub fn default_snapshot_name() -> String {
    format!(
        "snap-{}",
        crate::clock::format_time(std::time::SystemTime::now()).replace([':', '-'], "")
    )
}

/// How to open a VM's SPICE display.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpiceAccess {
    /// `spice://HOST:PORT` for a display reached directly.
    pub uri: Option<String>,
    /// A `remote-viewer` connection file (0600) holding a one-time ticket.
    pub viewer_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum SnapshotAction {
    Create { name: Option<String> },
    List,
    Revert { name: String },
    Delete { name: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// Unix time in seconds.
    pub created: u64,
    /// The VM's state when the snapshot was taken.
    pub state: String,
}

/// What `up` did to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpAction {
    Created,
    Redefined,
    Started,
    AlreadyRunning,
}

impl UpAction {
    pub fn text(self) -> &'static str {
        match self {
            Self::Created => "created and started",
            Self::Redefined => "redefined and started",
            Self::Started => "started",
            Self::AlreadyRunning => "already running",
        }
    }
}

/// What `up` reports for one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpOutcome {
    pub name: String,
    pub backend: String,
    pub action: UpAction,
    pub restart_needed: bool,
    pub ssh_port: Option<u16>,
    pub spice_port: Option<u16>,
    /// Seconds from the end of the start until SSH and the agent answered (when waited for).
    pub ssh_ready_seconds: Option<f64>,
    /// The guest's SSH host key was read and pinned (`agentvm ssh` checks it strictly).
    pub host_key_pinned: bool,
    /// Time spent in each phase, in order.
    pub timings: Vec<Phase>,
}

/// One timed phase of an operation (`image`, `overlay`, `xml`, `define`, `start`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    pub phase: String,
    pub ms: f64,
}

/// Wall time of each phase of an operation.
pub struct Timings {
    last: Instant,
    pub phases: Vec<Phase>,
}

impl Timings {
    pub fn start() -> Self {
        Self {
            last: Instant::now(),
            phases: Vec::new(),
        }
    }

    /// Ends the phase `phase` now.
    pub fn mark(&mut self, phase: &str) {
        let now = Instant::now();
        self.phases.push(Phase {
            phase: phase.to_string(),
            ms: (now - self.last).as_secs_f64() * 1000.0,
        });
        self.last = now;
    }
}

/// How `down` stopped a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DownPath {
    AlreadyStopped,
    /// The guest shut down when its agent was asked to (QGA `guest-shutdown`).
    Agent,
    /// The guest shut down after an ACPI power button press.
    Acpi,
    /// Forced off, at once (`--force`) or after the timeout.
    Forced,
}

/// What `image push` did on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PushAction {
    /// A new template was made.
    Pushed,
    /// A template of the image with the same digest was already there.
    Unchanged,
}

/// The template an image is on a backend after `image push`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushed {
    pub vmid: u32,
    pub node: String,
    /// `sha256:<hex>` of the disk the template was made from.
    pub digest: String,
    pub action: PushAction,
}
