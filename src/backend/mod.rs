//! The one interface every place VMs can run implements. Capabilities a backend
//! lacks return [`BackendError::Unsupported`], never a fake success.

pub mod libvirt;
pub mod proxmox;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::progress::Reporter;
use crate::spec::{ImageSpec, VmSpec};
use crate::ssh::Endpoint;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the {backend} backend does not support {capability}")]
    Unsupported {
        backend: &'static str,
        capability: &'static str,
    },
    #[error("no VM named {0:?} exists on this backend")]
    NotFound(String),
    #[error("{name} is readonly: refusing to {action} it (set readonly = false in its spec first)")]
    ReadOnly { name: String, action: &'static str },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// The lifecycle state shown by `list` and `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Stopped,
    Crashed,
    Absent,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Crashed => "crashed",
            Self::Absent => "absent",
        }
    }
}

/// What a backend knows about one of its VMs.
#[derive(Debug, Clone, Serialize)]
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
    /// `ready`, `not-responding`, `disabled` (the image has no agent), or `stopped`.
    pub agent: String,
}

/// What `up` would do to one VM.
#[derive(Debug, Clone, Default, Serialize)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub key: String,
    pub old: Option<String>,
    pub new: String,
}

/// Which output stream of a guest command bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How a command run in the guest ended.
#[derive(Debug, Clone, Serialize)]
pub struct ExecOutcome {
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
}

/// A VM's SSH host key, as pinned into its known_hosts.
#[derive(Debug, Clone, Serialize)]
pub struct HostKey {
    /// `ssh-ed25519 AAAA…`
    pub key: String,
    /// `agent` (read from the guest's file) or `ssh-keyscan` (the agent was missing).
    pub source: String,
    pub known_hosts: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum SnapshotAction {
    Create { name: Option<String> },
    List,
    Revert { name: String },
    Delete { name: String },
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// Unix time in seconds.
    pub created: u64,
    /// The VM's state when the snapshot was taken.
    pub state: String,
}

/// What `up` did to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpAction {
    Created,
    Redefined,
    Started,
    AlreadyRunning,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpOutcome {
    pub name: String,
    pub action: UpAction,
    pub restart_needed: bool,
    pub ssh_port: u16,
    pub spice_port: Option<u16>,
    /// Time spent in each phase, in order.
    pub timings: Vec<Phase>,
}

/// One timed phase of an operation (`image`, `overlay`, `xml`, `define`, `start`).
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub phase: String,
    pub ms: f64,
}

/// How `down` stopped a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DownPath {
    AlreadyStopped,
    /// The guest shut down when its agent was asked to (QGA `guest-shutdown`).
    Agent,
    /// The guest shut down after an ACPI power button press (QMP `system_powerdown`).
    Acpi,
    /// Forced off, at once (`--force`) or after the timeout.
    Forced,
}

pub trait Backend {
    /// The backend's name as VMs refer to it (`local`, or a `[backends.NAME]`).
    fn name(&self) -> &str;

    /// Imports the VM's image, then creates, redefines or starts the VM as needed.
    /// Does not wait for the guest.
    /// `image` is the VM's image where the backend uses one (the local backend does).
    fn up(
        &self,
        spec: &VmSpec,
        image: Option<&ImageSpec>,
        progress: &dyn Reporter,
    ) -> Result<UpOutcome>;

    /// Waits until the VM answers on SSH; returns how long that took.
    fn wait_ready(&self, name: &str, timeout: Duration) -> Result<Duration>;

    /// Stops the VM: gracefully, then by force after `timeout` (or at once with `force`).
    fn down(&self, name: &str, force: bool, timeout: Duration) -> Result<DownPath>;

    /// Removes the VM and everything it owns.
    fn destroy(&self, name: &str) -> Result<()>;

    /// The VM's status; `spec` is its current spec, if it still has one.
    fn status(&self, name: &str, spec: Option<&VmSpec>) -> Result<VmStatus>;

    /// Every VM this backend manages.
    fn list(&self) -> Result<Vec<VmStatus>>;

    fn ssh_endpoint(&self, name: &str) -> Result<Endpoint>;

    /// The file the VM's serial console is logged to.
    fn serial_log(&self, _name: &str) -> Result<PathBuf> {
        Err(self.unsupported("a serial console log"))
    }

    /// The `spice://` URI of the VM's display.
    fn spice_uri(&self, _name: &str) -> Result<String> {
        Err(self.unsupported("SPICE"))
    }

    /// What `up` would change, without changing anything.
    fn plan(&self, _spec: &VmSpec, _image: Option<&ImageSpec>) -> Result<Plan> {
        Err(self.unsupported("plan"))
    }

    /// Runs a command in the guest without the network; output goes to `output`
    /// as the guest agent delivers it.
    fn exec(
        &self,
        _name: &str,
        _argv: &[String],
        _timeout: Duration,
        _output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        Err(self.unsupported("exec"))
    }

    /// Reads the guest's SSH host key and pins it for `agentvm ssh`.
    fn host_key(&self, _name: &str) -> Result<HostKey> {
        Err(self.unsupported("reading host keys"))
    }

    /// Saves the guest's display as a PNG file; returns its width and height.
    fn screenshot(&self, _name: &str, _png: &std::path::Path) -> Result<(u32, u32)> {
        Err(self.unsupported("screenshots"))
    }

    /// Creates, lists, reverts to or deletes snapshots.
    fn snapshot(&self, _name: &str, _action: &SnapshotAction) -> Result<Vec<SnapshotInfo>> {
        Err(self.unsupported("snapshots"))
    }

    fn unsupported(&self, capability: &'static str) -> BackendError {
        BackendError::Unsupported {
            backend: self.kind(),
            capability,
        }
    }

    /// The kind of backend (`libvirt`, `proxmox`).
    fn kind(&self) -> &'static str;
}
