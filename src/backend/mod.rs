//! The places VMs run. A backend supplies steps through small role traits;
//! `orchestrate` runs the sequences (`up`, `down`) once for every backend, and
//! `registry` resolves a VM to the backend it lives on.
//!
//! Capabilities a backend lacks return [`BackendError::Unsupported`], naming
//! what to do instead — never a fake success.

pub mod fork;
pub mod libvirt;
pub mod orchestrate;
pub mod proxmox;
pub mod registry;
pub mod stream;
mod types;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::image::BaseDisk;
use crate::progress::Reporter;
use crate::spec::{ImageSpec, VmSpec};
use crate::ssh::Endpoint;
pub use fork::{ForkOutcome, Forked, ForkedVm, Forks};
pub use types::*;

/// How the default [`Lifecycle::wait_stopped`] polls: 5 ms growing to 100 ms.
const STOP_POLL_FIRST: Duration = Duration::from_millis(5);
const STOP_POLL_MAX: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the {backend} backend does not support {capability}: {instead}")]
    Unsupported {
        backend: &'static str,
        capability: &'static str,
        /// What to do instead.
        instead: String,
    },
    #[error("no VM named {0:?} exists on this backend")]
    NotFound(String),
    #[error("{name} is readonly: refusing to {action} it (set readonly = false in its spec first)")]
    ReadOnly { name: String, action: &'static str },
    /// A step that changes a VM lost its connection to the backend midway; the
    /// message says what was being done and the state the VM was left in.
    #[error("{0}")]
    Interrupted(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl BackendError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Unsupported { .. } => ErrorKind::Unsupported,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::ReadOnly { .. } => ErrorKind::Readonly,
            Self::Interrupted(_) | Self::Other(_) => ErrorKind::Failed,
        }
    }
}

/// The kind of an error, as `--json` output names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    Unsupported,
    NotFound,
    Readonly,
    Busy,
    Failed,
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// The steps every backend supplies: finding, making, starting, stopping and
/// removing VMs, and what `list`/`status`/`plan`/`ssh` need.
pub trait Lifecycle: Send + Sync {
    /// The kind of backend (`libvirt`, `proxmox`).
    fn kind(&self) -> &'static str;

    /// The VM `name`, if this backend has it. A VM of the same name that agentvm
    /// did not make is an error, not `None`.
    fn find(&self, name: &str) -> Result<Option<Existing>>;

    /// Gets what `create`/`reconfigure` need (the image imported or built, the
    /// template found) and the hash `spec` has here.
    fn prepare(
        &self,
        spec: &VmSpec,
        image: Option<&ImageSpec>,
        progress: &dyn Reporter,
    ) -> Result<Prepared>;

    /// Makes the VM, stopped. On error nothing of it is left.
    fn create(
        &self,
        spec: &VmSpec,
        prepared: &Prepared,
        timings: &mut Timings,
        progress: &dyn Reporter,
    ) -> Result<()>;

    /// Brings a stopped VM in line with `spec` where it differs (or must change,
    /// such as ports now taken by others); returns whether anything changed.
    fn reconfigure(
        &self,
        spec: &VmSpec,
        prepared: &Prepared,
        existing: &Existing,
        timings: &mut Timings,
        progress: &dyn Reporter,
    ) -> Result<bool>;

    fn start(&self, name: &str, progress: &dyn Reporter) -> Result<()>;

    fn is_running(&self, name: &str) -> Result<bool>;

    /// Waits until the VM is off (true) or `deadline` passes (false). The
    /// default polls [`Lifecycle::is_running`] with growing sleeps; a backend
    /// with events returns as soon as the VM stops.
    fn wait_stopped(&self, name: &str, deadline: Instant) -> Result<bool> {
        let mut backoff = crate::backoff::Backoff::new(STOP_POLL_FIRST, STOP_POLL_MAX);
        loop {
            if !self.is_running(name)? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            backoff.sleep_until(deadline);
        }
    }

    /// Waits until the guest's SSH server sends its banner.
    fn wait_ssh(&self, name: &str, deadline: Instant) -> Result<()>;

    /// Presses the ACPI power button; does not wait.
    fn acpi_shutdown(&self, name: &str) -> Result<()>;

    fn force_off(&self, name: &str) -> Result<()>;

    /// Removes the VM and everything it owns (stopping it first).
    fn remove(&self, name: &str) -> Result<()>;

    /// The VM's status; `spec` is its current spec, if it still has one.
    fn status(&self, name: &str, spec: Option<&VmSpec>) -> Result<VmStatus>;

    /// Every VM this backend manages; `specs` are the fleet file's VMs, used
    /// for the VMs they name (readonly, purpose, restart needed).
    fn list(&self, specs: &[VmSpec]) -> Result<Vec<VmStatus>>;

    /// Every managed VM's state, without asking guests anything (cheap enough to poll).
    fn states(&self) -> Result<Vec<(String, State)>>;

    /// What `up` would change, without changing anything.
    fn plan(&self, spec: &VmSpec, image: Option<&ImageSpec>) -> Result<Plan>;

    /// Where and how `ssh` reaches the VM.
    fn ssh_endpoint(&self, name: &str) -> Result<Endpoint>;

    /// The guest's system was changed from outside its image (`agentvm
    /// provision`): a VM that boots its image's kernel directly must boot
    /// through its own bootloader from its next start on. Returns how it
    /// boots now, when that changed; backends whose VMs always boot from
    /// their disk have nothing to change.
    fn system_changed(&self, _name: &str) -> Result<Option<String>> {
        Ok(None)
    }

    /// Whether the running VM `spec` names got other env values at its start
    /// than `spec` has now (so a restart is needed to deliver them).
    fn env_stale(&self, _spec: &VmSpec) -> Result<bool> {
        Ok(false)
    }

    /// The typed error for a capability this backend lacks.
    fn unsupported(&self, capability: &'static str, instead: &str) -> BackendError {
        BackendError::Unsupported {
            backend: self.kind(),
            capability,
            instead: instead.to_string(),
        }
    }
}

/// Talking to the guest through its agent, without the network.
pub trait GuestAgent: Lifecycle {
    /// Whether the VM's guest runs an agent that `up` should wait for.
    fn agent_expected(&self, _name: &str) -> Result<bool> {
        Ok(false)
    }

    /// Waits until the agent answers a ping.
    fn wait_agent(&self, _name: &str, _deadline: Instant) -> Result<()> {
        Err(self.unsupported("a guest agent", "rely on SSH"))
    }

    /// Asks the guest to power off through its agent; does not wait.
    fn agent_shutdown(&self, _name: &str) -> Result<()> {
        Err(self.unsupported("shutdown through the guest agent", "agentvm down uses ACPI"))
    }

    /// Hands the running guest the env of `spec` where the backend cannot do it
    /// at start (Proxmox: through the agent, in the background, as soon as the
    /// agent answers). Does not wait; local guests got it at start.
    fn deliver_env(&self, _spec: &VmSpec, _progress: &dyn Reporter) -> Result<()> {
        Ok(())
    }

    /// Waits until a delivery `deliver_env` started has ended (written or failed).
    fn wait_env(&self, _name: &str, _deadline: Instant) -> Result<()> {
        Ok(())
    }

    /// Runs a command in the guest with `stdin` as its input; output goes to
    /// `output` as the agent delivers it.
    fn exec(
        &self,
        _name: &str,
        _argv: &[String],
        _stdin: Option<&[u8]>,
        _timeout: Duration,
        _output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        Err(self.unsupported("exec", "use agentvm ssh NAME -- CMD"))
    }

    /// Sets the guest's clock to the host's (after the host slept, the guest's
    /// clock lags by the time asleep); returns how far the guest was off
    /// before, in milliseconds (guest minus host).
    fn sync_clock(&self, _name: &str) -> Result<i64> {
        Err(self.unsupported(
            "setting the guest clock",
            "the guest's own NTP client keeps its clock (the node does not sleep)",
        ))
    }

    /// The bytes of the guest file `path`, read through the agent.
    fn read_file(&self, _name: &str, _path: &str) -> Result<Vec<u8>> {
        Err(self.unsupported("reading guest files", "use agentvm exec NAME -- cat PATH"))
    }

    /// Writes `data` to the guest file `path` (made or replaced) through the
    /// agent; `mode` (such as 0o600) is set on it when given.
    fn write_file(&self, _name: &str, _path: &str, _data: &[u8], _mode: Option<u32>) -> Result<()> {
        Err(self.unsupported(
            "writing guest files",
            "use agentvm exec -i NAME -- tee PATH",
        ))
    }

    /// Up to `length` bytes of the guest file `path` from `offset`, read
    /// through the agent; fewer only at the file's end.
    fn read_file_range(
        &self,
        _name: &str,
        _path: &str,
        _offset: u64,
        _length: usize,
    ) -> Result<Vec<u8>> {
        Err(self.unsupported("reading guest files", "use agentvm exec NAME -- cat PATH"))
    }

    /// Adds `data` at the end of the existing guest file `path` through the agent.
    fn append_file(&self, _name: &str, _path: &str, _data: &[u8]) -> Result<()> {
        Err(self.unsupported(
            "writing guest files",
            "use agentvm exec -i NAME -- tee -a PATH",
        ))
    }

    /// Reads the guest's SSH host key and pins it for `agentvm ssh`.
    fn host_key(&self, _name: &str) -> Result<HostKey> {
        Err(self.unsupported(
            "reading host keys",
            "check the key on first `agentvm ssh` by hand",
        ))
    }
}

/// What a command run through the agent ended with, and its whole output.
pub struct Captured {
    pub outcome: ExecOutcome,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Captured {
    pub fn succeeded(&self) -> bool {
        self.outcome.exit_code == Some(0)
    }

    /// Standard error as trimmed text, for an error message.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }
}

/// Runs `argv` in the guest through the agent and keeps its output.
pub fn exec_captured(
    backend: &(impl GuestAgent + ?Sized),
    name: &str,
    argv: &[String],
    timeout: Duration,
) -> Result<Captured> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let outcome = backend.exec(
        name,
        argv,
        None,
        timeout,
        &mut |stream, data| match stream {
            Stream::Stdout => stdout.extend_from_slice(data),
            Stream::Stderr => stderr.extend_from_slice(data),
        },
    )?;
    Ok(Captured {
        outcome,
        stdout,
        stderr,
    })
}

/// Sets the mode of the guest file `path` (after `write_file`) with `chmod`
/// run through the agent, as both backends do.
pub fn chmod_through_agent(
    backend: &(impl GuestAgent + ?Sized),
    name: &str,
    path: &str,
    mode: u32,
) -> Result<()> {
    // Through sh, so `chmod` is found on the exec PATH (NixOS has no /bin/chmod).
    let argv = [
        "/bin/sh".to_string(),
        "-c".to_string(),
        "exec chmod \"$0\" \"$1\"".to_string(),
        format!("{mode:o}"),
        path.to_string(),
    ];
    let ran = exec_captured(backend, name, &argv, Duration::from_secs(30))?;
    if !ran.succeeded() {
        return Err(anyhow::anyhow!(
            "{name}: {path} was written, but chmod {mode:o} failed: {}",
            ran.stderr_text()
        )
        .into());
    }
    Ok(())
}

/// Snapshots of a VM's disk (and memory).
pub trait Snapshots: Lifecycle {
    /// Creates, lists, reverts to or deletes snapshots.
    fn snapshot(&self, _name: &str, _action: &SnapshotAction) -> Result<Vec<SnapshotInfo>> {
        Err(self.unsupported("snapshots", "use the backend's own snapshot tools"))
    }
}

/// The VM's console and display.
pub trait Display: Lifecycle {
    /// The file the VM's serial console is logged to (on this machine).
    fn serial_log(&self, _name: &str) -> Result<PathBuf> {
        Err(self.unsupported(
            "a serial console log",
            "use the backend's own console (the Proxmox web UI)",
        ))
    }

    /// How to open the VM's SPICE display: a `spice://` URI, or a
    /// `remote-viewer` connection file (0600) for displays behind a proxy.
    fn spice(&self, _name: &str) -> Result<SpiceAccess> {
        Err(self.unsupported(
            "SPICE",
            "use the backend's own console (the Proxmox web UI)",
        ))
    }

    /// Saves the guest's display as a PNG file; returns its width and height.
    fn screenshot(&self, _name: &str, _png: &Path) -> Result<(u32, u32)> {
        Err(self.unsupported(
            "screenshots",
            "use the backend's own console (the Proxmox web UI)",
        ))
    }
}

/// The image's disk from this machine's image store, imported or built on
/// first call (as `up` would): a backend that cannot take images never pays for it.
pub type DiskSource<'a> = &'a dyn Fn() -> anyhow::Result<BaseDisk>;

/// Making the backend's own templates from agentvm images.
pub trait Templates: Lifecycle {
    /// Makes a template of `image` from its disk unless one with the same
    /// digest is already there. On error nothing of it is left.
    fn push_image(
        &self,
        _image: &ImageSpec,
        _disk: DiskSource<'_>,
        _progress: &dyn Reporter,
    ) -> Result<Pushed> {
        Err(self.unsupported(
            "image push",
            "make a template with the backend's own tools and name it in the backend's settings",
        ))
    }
}

/// Host ports forwarded into a running VM.
pub trait Forwards: Lifecycle {
    /// Lists, adds or removes forwards of the running VM; returns them all.
    fn forward(&self, _name: &str, _change: &ForwardChange) -> Result<Vec<ForwardStatus>> {
        Err(self.unsupported(
            "port forwards",
            "Proxmox VMs are reached on their own address; open the port in the guest's firewall",
        ))
    }
}

/// Host folders shared with the guest.
pub trait Shares: Lifecycle {
    /// Mounts the running VM's shares in the guest (where they are not yet).
    fn mount_shares(&self, _name: &str, _progress: &dyn Reporter) -> Result<()> {
        Err(self.unsupported(
            "shared folders",
            "copy files with agentvm cp NAME:PATH, or share the folder from the node yourself",
        ))
    }

    /// Running VMs whose shares stopped working, with what to do: (VM, message).
    fn share_problems(&self) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }
}

/// Everything a place VMs run offers; the daemon holds backends as `dyn Backend`.
pub trait Backend:
    GuestAgent + Snapshots + Display + Templates + Forwards + Shares + Forks
{
}

impl<T: GuestAgent + Snapshots + Display + Templates + Forwards + Shares + Forks> Backend for T {}
