//! `fork`: running copies of a running VM's exact state (memory, devices,
//! disk). The backend makes and restores the copies (`Forks::fork`); the
//! sequence here then gives them new identities when asked and waits for
//! them as `up` does.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use serde::{Deserialize, Serialize};

use super::orchestrate::{pin_host_key, wait_ready};
use super::{Backend, Lifecycle, Result};
use crate::progress::Reporter;

/// How long `--new-identity` waits for the fork's agent when `fork` itself
/// does not wait.
const IDENTITY_AGENT_WAIT: Duration = Duration::from_secs(120);
/// How long regenerating the guest's keys may take.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(60);

/// What the backend made: the forks, restored and running.
#[derive(Debug, Clone)]
pub struct Forked {
    /// How long the snapshot of the source took (it ran meanwhile, paused
    /// only at the end).
    pub snapshot_seconds: f64,
    /// How long the source was seen paused during it.
    pub paused_seconds: f64,
    pub vms: Vec<ForkedVm>,
}

/// One fork, as `fork` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForkedVm {
    pub name: String,
    pub ssh_port: u16,
    pub spice_port: u16,
    /// Seconds from the start of `fork` until it answered on SSH (`None`
    /// with `--no-wait`).
    pub ssh_ready_seconds: Option<f64>,
    /// The guest got new SSH host keys, and a new machine-id where it has
    /// one (`--new-identity`).
    pub new_identity: bool,
    pub host_key_pinned: bool,
}

/// The answer to `fork`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForkOutcome {
    pub source: String,
    pub snapshot_seconds: f64,
    pub paused_seconds: f64,
    pub forks: Vec<ForkedVm>,
}

/// Copies of a running VM.
pub trait Forks: Lifecycle {
    /// Makes `new` (each a new VM name) running copies of the running VM
    /// `source`: its memory, devices and disk as they are now, the source
    /// running on. The forks keep the source's SSH host key, pinned for them.
    fn fork(&self, _source: &str, _new: &[String], _progress: &dyn Reporter) -> Result<Forked> {
        Err(self.unsupported(
            "fork",
            "make a linked clone with the backend's own tools (on Proxmox: qm clone VMID NEWID), \
             or agentvm up a new VM",
        ))
    }

    /// Makes the stopped VMs that sit on `name`'s disk (forks of it, and
    /// their forks) independent of it, so it can be destroyed; returns them.
    fn flatten(&self, _name: &str, _progress: &dyn Reporter) -> Result<Vec<String>> {
        Err(self.unsupported(
            "flatten",
            "only forks of local VMs sit on another VM's disk",
        ))
    }
}

/// Guest commands that give a running guest new SSH host keys (OpenSSH or
/// dropbear) and a new machine-id, and restart its SSH server. Prints what it
/// could not do on stderr and exits non-zero when no host key was made.
const NEW_IDENTITY_SCRIPT: &str = r#"
made=
if command -v ssh-keygen >/dev/null 2>&1 && [ -e /etc/ssh/sshd_config ]; then
    rm -f /etc/ssh/ssh_host_*
    ssh-keygen -A >/dev/null && made=openssh
    systemctl restart ssh 2>/dev/null || systemctl restart sshd 2>/dev/null ||
        pkill -HUP -x sshd 2>/dev/null || echo "sshd not restarted" >&2
elif command -v dropbearkey >/dev/null 2>&1 && [ -d /etc/dropbear ]; then
    key=/etc/dropbear/dropbear_ed25519_host_key
    rm -f /etc/dropbear/dropbear_*_host_key
    dropbearkey -t ed25519 -f "$key" >/dev/null 2>&1 && made=dropbear
    if [ -e /etc/ssh/ssh_host_ed25519_key.pub ] || [ -d /etc/ssh ]; then
        dropbearkey -y -f "$key" | awk '$1 == "ssh-ed25519" { print $1, $2 }' \
            > /etc/ssh/ssh_host_ed25519_key.pub
    fi
    if systemctl restart dropbear 2>/dev/null; then :
    elif [ -f /run/dropbear.pid ]; then
        kill "$(cat /run/dropbear.pid)" 2>/dev/null
        sleep 1
        dropbear -s -p 22 -r "$key" -P /run/dropbear.pid </dev/null >/dev/null 2>&1 ||
            echo "dropbear not restarted" >&2
    else
        echo "dropbear not restarted" >&2
    fi
fi
[ -n "$made" ] || { echo "no ssh-keygen (with /etc/ssh/sshd_config) nor dropbearkey in the guest" >&2; exit 3; }
echo "$made"
if [ -e /etc/machine-id ]; then
    rm -f /etc/machine-id
    systemd-machine-id-setup >/dev/null 2>&1 ||
        sed 's/-//g' /proc/sys/kernel/random/uuid > /etc/machine-id
    echo machine-id
fi
"#;

/// Forks `source` into `new` on `backend`; with `wait`, until each fork
/// answers on SSH; with `new_identity`, each fork gets new SSH host keys and
/// machine-id (through its agent) and the new key is pinned.
pub fn fork(
    backend: &dyn Backend,
    source: &str,
    new: &[String],
    wait: Option<Duration>,
    new_identity: bool,
    progress: &dyn Reporter,
) -> Result<ForkOutcome> {
    let start = Instant::now();
    let forked = backend.fork(source, new, progress)?;
    let forks = std::thread::scope(|scope| {
        let handles: Vec<_> = forked
            .vms
            .iter()
            .map(|vm| {
                scope
                    .spawn(move || finish(backend, vm.clone(), wait, new_identity, start, progress))
            })
            .collect();
        handles
            .into_iter()
            .zip(&forked.vms)
            .map(|(handle, vm)| {
                handle.join().unwrap_or_else(|_| {
                    Err(anyhow!("{}: finishing the fork panicked", vm.name).into())
                })
            })
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(ForkOutcome {
        source: source.to_string(),
        snapshot_seconds: forked.snapshot_seconds,
        paused_seconds: forked.paused_seconds,
        forks,
    })
}

/// A restored fork: its new identity, then the wait for SSH.
fn finish(
    backend: &dyn Backend,
    mut vm: ForkedVm,
    wait: Option<Duration>,
    new_identity: bool,
    start: Instant,
    progress: &dyn Reporter,
) -> Result<ForkedVm> {
    let name = vm.name.clone();
    if new_identity {
        backend.wait_agent(&name, Instant::now() + wait.unwrap_or(IDENTITY_AGENT_WAIT))?;
        let done = regenerate_identity(backend, &name)?;
        progress.step(&name, &format!("new identity: {done}"));
        vm.new_identity = true;
        vm.host_key_pinned = pin_host_key(backend, &name, progress);
    }
    if let Some(timeout) = wait {
        wait_ready(backend, &name, timeout)?;
        let took = start.elapsed().as_secs_f64();
        progress.step(&name, &format!("ssh-ready {took:.1} s after fork began"));
        vm.ssh_ready_seconds = Some(took);
    }
    Ok(vm)
}

/// Runs [`NEW_IDENTITY_SCRIPT`] in the guest; returns what it did.
fn regenerate_identity(backend: &dyn Backend, name: &str) -> Result<String> {
    let argv = ["/bin/sh", "-c", NEW_IDENTITY_SCRIPT].map(String::from);
    let ran = super::exec_captured(backend, name, &argv, IDENTITY_TIMEOUT)?;
    if !ran.succeeded() {
        return Err(anyhow!(
            "{name}: could not give the fork a new identity: {}",
            ran.stderr_text()
        )
        .into());
    }
    let err = String::from_utf8_lossy(&ran.stderr);
    let out = String::from_utf8_lossy(&ran.stdout);
    let mut lines = out.lines();
    let server = lines.next().unwrap_or("?").trim();
    let machine_id = if lines.any(|l| l.trim() == "machine-id") {
        "new machine-id"
    } else {
        "no /etc/machine-id to renew"
    };
    let mut done = format!("new SSH host keys ({server}), {machine_id}");
    let err = err.trim();
    if !err.is_empty() {
        done = format!("{done}; {err}");
    }
    Ok(done)
}
