//! The sequences every backend runs, written once: `up` (prepare → create if
//! absent → apply a changed spec → start → wait for SSH and the agent together
//! → pin the host key) and `down` (agent → ACPI → force after the timeout).
//! Backends that cannot hand the guest its env at start deliver it through the
//! agent after every start (`deliver_env`), in the background, so `--no-wait`
//! gets it too.
//! Backends supply the steps (see the role traits in `backend`).

use std::time::{Duration, Instant};

use anyhow::anyhow;

use super::{Backend, BackendError, DownPath, Existing, Result, Timings, UpAction, UpOutcome};
use crate::failpoint;
use crate::progress::Reporter;
use crate::spec::{ImageSpec, VmSpec};

/// The share of `down --timeout` given to the guest agent before ACPI is tried.
const AGENT_SHARE: u32 = 2;

/// Brings `spec` up on `backend` (named `backend_name`), where `existing` is
/// what `find` said of it under the VM's lock; with `wait`, until the guest
/// answers on SSH and (when it has one) through its agent.
pub fn up(
    backend: &dyn Backend,
    backend_name: &str,
    existing: Option<Existing>,
    spec: &VmSpec,
    image: Option<&ImageSpec>,
    wait: Option<Duration>,
    progress: &dyn Reporter,
) -> Result<UpOutcome> {
    let name = spec.name.as_str();
    let mut timings = Timings::start();
    let prepared = backend.prepare(spec, image, progress)?;
    failpoint::hit("up:image-imported");
    timings.mark("image");

    let (action, restart_needed) = match existing {
        None => {
            backend.create(spec, &prepared, &mut timings, progress)?;
            start_new(backend, name, &mut timings, progress)?;
            backend.deliver_env(spec, progress)?;
            (UpAction::Created, false)
        }
        Some(existing) if existing.running => {
            let drift = existing.spec_hash != prepared.spec_hash;
            if drift {
                progress.step(name, "running, but its spec changed: restart needed");
            }
            // A backend that delivers env through the guest agent brings the
            // running guest the current values now.
            backend.deliver_env(spec, progress)?;
            let env_stale = backend.env_stale(spec)?;
            if env_stale {
                progress.step(
                    name,
                    "running, but its env values changed: they reach the guest at its next start",
                );
            }
            (UpAction::AlreadyRunning, drift || env_stale)
        }
        Some(existing) => {
            // The spec says whether the VM is readonly now; what the backend
            // recorded is for VMs that have left the fleet file.
            if existing.spec_hash != prepared.spec_hash && spec.readonly {
                return Err(BackendError::ReadOnly {
                    name: name.to_string(),
                    action: "redefine",
                });
            }
            let changed =
                backend.reconfigure(spec, &prepared, &existing, &mut timings, progress)?;
            if changed {
                progress.step(name, "redefined from its changed spec");
            }
            backend.start(name, progress)?;
            backend.deliver_env(spec, progress)?;
            timings.mark("start");
            let action = if changed {
                UpAction::Redefined
            } else {
                UpAction::Started
            };
            (action, false)
        }
    };
    finish_up(
        backend,
        backend_name,
        name,
        (action, restart_needed),
        timings,
        wait,
        !spec.shares.is_empty(),
        progress,
    )
}

/// `up` of a VM that has no spec in the fleet file (a fork, or a VM whose
/// `[vms.NAME]` was removed): started as it was defined, on its recorded
/// ports. Nothing is redefined and no env delivered (both need a spec), and
/// `up` mounts no shares: forks have none, and a removed VM's shares are
/// served but mounted only by guests that read the `fstab.extra` credential.
pub fn up_as_defined(
    backend: &dyn Backend,
    backend_name: &str,
    name: &str,
    existing: Option<Existing>,
    wait: Option<Duration>,
    progress: &dyn Reporter,
) -> Result<UpOutcome> {
    let existing = existing.ok_or_else(|| BackendError::NotFound(name.to_string()))?;
    let mut timings = Timings::start();
    let action = if existing.running {
        UpAction::AlreadyRunning
    } else {
        progress.step(
            name,
            "not in the fleet file: starting it as it was defined (add [vms.NAME] to manage it)",
        );
        backend.start(name, progress)?;
        timings.mark("start");
        UpAction::Started
    };
    finish_up(
        backend,
        backend_name,
        name,
        (action, false),
        timings,
        wait,
        false,
        progress,
    )
}

/// The end of every `up`: reports the ports, then with `wait` waits for SSH,
/// pins the host key and mounts the shares.
#[allow(clippy::too_many_arguments)]
fn finish_up(
    backend: &dyn Backend,
    backend_name: &str,
    name: &str,
    (action, restart_needed): (UpAction, bool),
    timings: Timings,
    wait: Option<Duration>,
    shares: bool,
    progress: &dyn Reporter,
) -> Result<UpOutcome> {
    let now = backend
        .find(name)?
        .ok_or_else(|| anyhow!("{name} is gone right after up (removed by someone else?)"))?;
    progress.step(
        name,
        &match now.ssh_port {
            Some(port) => format!("{} (ssh port {port})", action.text()),
            None => action.text().to_string(),
        },
    );
    let mut outcome = UpOutcome {
        name: name.to_string(),
        backend: backend_name.to_string(),
        action,
        restart_needed,
        ssh_port: now.ssh_port,
        spice_port: now.spice_port,
        ssh_ready_seconds: None,
        host_key_pinned: false,
        timings: timings.phases,
    };
    if let Some(timeout) = wait {
        let wait_start = Instant::now();
        let took = wait_ready(backend, name, timeout)?;
        progress.step(name, &format!("ssh-ready in {:.1} s", took.as_secs_f64()));
        outcome.ssh_ready_seconds = Some(took.as_secs_f64());
        outcome.host_key_pinned = pin_host_key(backend, name, progress);
        tracing::debug!("{name}: host key after {:?}", wait_start.elapsed());
        if shares {
            backend.mount_shares(name, progress)?;
        }
    }
    Ok(outcome)
}

/// Starts a VM `create` just made; if it cannot start, it is removed again so
/// that a failed `up` leaves nothing behind. A start interrupted by a lost
/// connection may have happened: that VM is kept, and the error says its state.
fn start_new(
    backend: &dyn Backend,
    name: &str,
    timings: &mut Timings,
    progress: &dyn Reporter,
) -> Result<()> {
    if let Err(e) = backend.start(name, progress) {
        if matches!(e, BackendError::Interrupted(_)) {
            return Err(e);
        }
        return Err(match backend.remove(name) {
            Ok(()) => e,
            Err(cleanup) => anyhow!(
                "{e}; removing the half-made VM failed too: {cleanup} (agentvm destroy {name})"
            )
            .into(),
        });
    }
    failpoint::hit("up:started");
    timings.mark("start");
    Ok(())
}

/// Waits for the SSH banner and the guest agent at once; returns how long it took.
pub fn wait_ready(backend: &dyn Backend, name: &str, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    let deadline = start + timeout;
    let agent = backend.agent_expected(name)?;
    std::thread::scope(|scope| {
        let agent_wait = agent.then(|| {
            scope.spawn(|| {
                let r = backend.wait_agent(name, deadline);
                tracing::debug!("{name}: agent answered after {:?}", start.elapsed());
                r
            })
        });
        let ssh = backend.wait_ssh(name, deadline);
        tracing::debug!("{name}: ssh answered after {:?}", start.elapsed());
        let agent = match agent_wait {
            Some(handle) => handle.join().unwrap_or_else(|_| {
                Err(anyhow!("{name}: waiting for the guest agent panicked").into())
            }),
            None => Ok(()),
        };
        ssh.and(agent)
    })?;
    Ok(start.elapsed())
}

/// Reads and pins the guest's host key; says why when it cannot (never fatal:
/// the VM is up, and `agentvm hostkey` can pin it later).
pub fn pin_host_key(backend: &dyn Backend, name: &str, progress: &dyn Reporter) -> bool {
    match backend.host_key(name) {
        Ok(key) => {
            progress.step(name, &format!("host key pinned ({})", key.source));
            true
        }
        Err(e) => {
            progress.step(name, &format!("host key not pinned: {e}"));
            false
        }
    }
}

/// Stops a VM: its agent first (half the timeout), then ACPI, then by force.
/// Returns what really stopped it.
pub fn down(backend: &dyn Backend, name: &str, force: bool, timeout: Duration) -> Result<DownPath> {
    if !backend.is_running(name)? {
        return Ok(DownPath::AlreadyStopped);
    }
    if force {
        backend.force_off(name)?;
        return Ok(DownPath::Forced);
    }
    let start = Instant::now();
    if backend.agent_expected(name)? {
        match backend.agent_shutdown(name) {
            Ok(()) => {
                if backend.wait_stopped(name, start + timeout / AGENT_SHARE)? {
                    return Ok(DownPath::Agent);
                }
            }
            Err(e) => tracing::info!("{name}: shutdown through the agent: {e}; trying ACPI"),
        }
    }
    match backend.acpi_shutdown(name) {
        Ok(()) => {
            if backend.wait_stopped(name, start + timeout)? {
                return Ok(DownPath::Acpi);
            }
        }
        Err(e) => tracing::warn!("{name}: ACPI shutdown: {e}; forcing it off"),
    }
    match backend.force_off(name) {
        Ok(()) => Ok(DownPath::Forced),
        // It went down on its own between the last check and now.
        Err(_) if !backend.is_running(name)? => Ok(DownPath::Acpi),
        Err(e) => Err(e),
    }
}
