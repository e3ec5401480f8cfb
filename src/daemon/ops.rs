//! Operations on VMs: each VM of a request on its own blocking task, under its
//! lock when the operation changes it, on whichever backend it lives on.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use tokio::sync::mpsc::UnboundedSender;

use super::Shared;
use crate::backend::registry::{Backends, Located, RemoteConfig};
use crate::backend::{BackendError, ErrorKind, SnapshotAction, VmStatus, orchestrate};
use crate::progress::Reporter;
use crate::protocol::{
    BackendFailure, Built, EgressReport, Event, FILE_CHUNK_BYTES, Op, Outcome, PushedImage, Reply,
    VmRef, VmResult,
};
use crate::spec::{ImageSource, ImageSpec, VmSpec};

/// Sends progress to the client as events.
pub struct Events {
    pub tx: UnboundedSender<Reply>,
}

impl Reporter for Events {
    fn step(&self, vm: &str, step: &str) {
        let _ = self.tx.send(Reply::Event(Event::Step {
            vm: vm.to_string(),
            step: step.to_string(),
        }));
    }

    fn bytes(&self, label: &str, done: u64, total: u64) {
        let _ = self.tx.send(Reply::Event(Event::Bytes {
            label: label.to_string(),
            done,
            total,
        }));
    }

    fn bytes_done(&self, label: &str) {
        let _ = self.tx.send(Reply::Event(Event::BytesDone {
            label: label.to_string(),
        }));
    }
}

/// The backends a request names, built on a blocking thread (a remote
/// backend's first use reads its settings and makes its HTTP client).
async fn backends(shared: &Arc<Shared>, configs: Vec<RemoteConfig>) -> anyhow::Result<Backends> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || shared.registry.view(&configs))
        .await
        .map_err(|e| anyhow!("building the backends failed: {e}"))?
}

/// Runs `op` on every VM of a request at once; results come in request order.
pub async fn run_vms(
    shared: Arc<Shared>,
    configs: Vec<RemoteConfig>,
    vms: Vec<VmRef>,
    op: Op,
    no_block: bool,
    tx: UnboundedSender<Reply>,
) -> Result<Vec<VmResult>, String> {
    let backends = backends(&shared, configs)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let mut tasks = Vec::new();
    for vm in vms {
        let (shared, backends, op, tx) = (shared.clone(), backends.clone(), op.clone(), tx.clone());
        let name = vm.name.clone();
        tasks.push((
            name.clone(),
            tokio::spawn(async move {
                let guard = if op.changes_vm() {
                    Some(shared.locks.acquire(&name, op.verb(), no_block).await)
                } else {
                    None
                };
                let guard = match guard.transpose() {
                    Ok(guard) => guard,
                    Err(busy) => {
                        return VmResult::failed(&name, ErrorKind::Busy, busy.to_string());
                    }
                };
                // A fork also holds the names of the VMs it makes. They must
                // be new, so an operation holding one is a conflict, not a
                // turn to wait for (waiting could deadlock with a fork the
                // other way round).
                let mut fork_guards = Vec::new();
                if let Op::Fork { new, .. } = &op {
                    let mut names = new.clone();
                    names.sort();
                    names.dedup();
                    for new_name in names {
                        match shared.locks.acquire(&new_name, op.verb(), true).await {
                            Ok(guard) => fork_guards.push(guard),
                            Err(busy) => {
                                return VmResult::failed(&name, ErrorKind::Busy, busy.to_string());
                            }
                        }
                    }
                }
                tokio::task::spawn_blocking(move || {
                    let _guard = guard;
                    let _fork_guards = fork_guards;
                    let events = Events { tx };
                    let mut result = perform(&backends, &vm, &op, &events);
                    super::egress::after(&shared.egress, &vm.name, &op, &mut result);
                    VmResult::new(&vm.name, result)
                })
                .await
                .unwrap_or_else(|e| {
                    VmResult::failed(
                        &name,
                        ErrorKind::Failed,
                        format!("the operation failed: {e}"),
                    )
                })
            }),
        ));
    }
    let mut results = Vec::new();
    for (name, task) in tasks {
        results.push(task.await.unwrap_or_else(|e| {
            VmResult::failed(
                &name,
                ErrorKind::Failed,
                format!("the operation failed: {e}"),
            )
        }));
    }
    Ok(results)
}

/// One operation on one VM, on the backend it lives on.
fn perform(
    backends: &Backends,
    vm: &VmRef,
    op: &Op,
    events: &Events,
) -> Result<Outcome, BackendError> {
    let name = vm.name.as_str();
    let spec = vm.spec.as_ref();
    let requested = match op {
        Op::Up { backend, .. } | Op::Plan { backend } => backend.as_deref(),
        _ => None,
    };
    let Located {
        backend_name,
        backend,
        existing,
    } = backends.locate(name, spec, requested, events)?;
    let backend = backend.as_ref();
    let check_writable = |action: &'static str| -> Result<(), BackendError> {
        let readonly = spec.map_or(existing.as_ref().is_some_and(|e| e.readonly), |s| {
            s.readonly
        });
        if readonly && existing.is_some() {
            return Err(BackendError::ReadOnly {
                name: name.to_string(),
                action,
            });
        }
        Ok(())
    };
    Ok(match op {
        Op::Up { wait_secs, .. } if vm.spec.is_none() && existing.is_some() => {
            // A VM without [vms.NAME] (a fork, or one whose entry was removed)
            // starts as it was defined.
            Outcome::Up(orchestrate::up_as_defined(
                backend,
                &backend_name,
                name,
                existing.clone(),
                wait_secs.map(Duration::from_secs),
                events,
            )?)
        }
        Op::Up { wait_secs, .. } => {
            let spec = with_backend(needs_spec(vm)?, &backend_name);
            // Found under the VM's lock: no other operation changed it since.
            Outcome::Up(orchestrate::up(
                backend,
                &backend_name,
                existing.clone(),
                &spec,
                vm.image.as_ref(),
                wait_secs.map(Duration::from_secs),
                events,
            )?)
        }
        Op::Down {
            force,
            timeout_secs,
        } => {
            check_writable("stop")?;
            if existing.is_none() {
                return Err(BackendError::NotFound(name.to_string()));
            }
            Outcome::Down {
                stopped_by: orchestrate::down(
                    backend,
                    name,
                    *force,
                    Duration::from_secs(*timeout_secs),
                )?,
            }
        }
        Op::Destroy => {
            check_writable("destroy")?;
            backend.remove(name)?;
            Outcome::Destroyed
        }
        Op::Status => Outcome::Status(Box::new(match existing {
            Some(_) => backend.status(name, spec)?,
            None => VmStatus::absent(name, &backend_name, spec),
        })),
        Op::Plan { .. } => {
            let spec = with_backend(needs_spec(vm)?, &backend_name);
            Outcome::Plan(backend.plan(&spec, vm.image.as_ref())?)
        }
        Op::SshEndpoint => Outcome::SshEndpoint(backend.ssh_endpoint(name)?),
        Op::Exec {
            argv,
            stdin,
            timeout_secs,
            stream,
        } => {
            let timeout = Duration::from_secs(*timeout_secs);
            let mut send = |stream, data: &[u8]| {
                let _ = events.tx.send(Reply::Event(Event::Output {
                    vm: name.to_string(),
                    stream,
                    data: data.to_vec(),
                }));
            };
            let outcome = if *stream {
                if stdin.is_some() {
                    return Err(anyhow::anyhow!(
                        "exec --stream takes no standard input (-i); run without --stream"
                    )
                    .into());
                }
                crate::backend::stream::exec_streaming(backend, name, argv, timeout, &mut send)?
            } else {
                backend.exec(name, argv, stdin.as_deref(), timeout, &mut send)?
            };
            Outcome::Exec(outcome)
        }
        Op::HostKey => Outcome::HostKey(backend.host_key(name)?),
        Op::SystemChanged => Outcome::SystemChanged {
            boot: backend.system_changed(name)?,
        },
        Op::ReadFile {
            path,
            offset,
            length,
        } => Outcome::FileRead {
            data: match length {
                None if *offset == 0 => backend.read_file(name, path)?,
                // The reply is bounded like requests: one chunk at most.
                _ => {
                    let length = length.map_or(FILE_CHUNK_BYTES, |l| {
                        usize::try_from(l).map_or(FILE_CHUNK_BYTES, |l| l.min(FILE_CHUNK_BYTES))
                    });
                    backend.read_file_range(name, path, *offset, length)?
                }
            },
        },
        Op::WriteFile {
            path,
            data,
            mode,
            append,
        } => {
            // Like exec, allowed on readonly VMs: readonly guards the VM, not its files.
            if *append {
                backend.append_file(name, path, data)?;
                if let Some(mode) = mode {
                    crate::backend::chmod_through_agent(backend, name, path, *mode)?;
                }
            } else {
                backend.write_file(name, path, data, *mode)?;
            }
            Outcome::FileWritten { bytes: data.len() }
        }
        Op::Screenshot { path } => {
            let (width, height) = backend.screenshot(name, path)?;
            Outcome::Screenshot { width, height }
        }
        Op::Snapshot { action } => {
            // Snapshots of a readonly VM may be made and listed, not reverted to or deleted.
            match action {
                SnapshotAction::Revert { .. } => check_writable("revert a snapshot of")?,
                SnapshotAction::Delete { .. } => check_writable("delete a snapshot of")?,
                SnapshotAction::Create { .. } | SnapshotAction::List => {}
            }
            Outcome::Snapshots {
                snapshots: backend.snapshot(name, action)?,
            }
        }
        Op::SerialLog => Outcome::SerialLog {
            path: backend.serial_log(name)?,
        },
        Op::Spice => Outcome::Spice(backend.spice(name)?),
        Op::SyncClock => Outcome::ClockSynced {
            drift_ms: backend.sync_clock(name)?,
        },
        Op::Fork {
            new,
            wait_secs,
            new_identity,
        } => {
            if existing.is_none() {
                return Err(BackendError::NotFound(name.to_string()));
            }
            Outcome::Forked(crate::backend::fork::fork(
                backend,
                name,
                new,
                wait_secs.map(Duration::from_secs),
                *new_identity,
                events,
            )?)
        }
        Op::Flatten => {
            check_writable("flatten the forks of")?;
            Outcome::Flattened {
                vms: backend.flatten(name, events)?,
            }
        }
        Op::Forward { change } => Outcome::Forwards {
            forwards: backend.forward(name, change)?,
        },
        // The policy as the backend holds it; the daemon adds its proxy's
        // state (`egress::after`).
        Op::Egress => Outcome::Egress(EgressReport {
            // The policy as the VM's metadata records it: no guest round trip.
            policy: match &existing {
                Some(found) => found.egress.clone(),
                None => return Err(BackendError::NotFound(name.to_string())),
            },
            tunnel: None,
            connections: Vec::new(),
        }),
    })
}

fn needs_spec(vm: &VmRef) -> Result<&VmSpec, BackendError> {
    vm.spec
        .as_ref()
        .ok_or_else(|| anyhow!("no [vms.{}] in agentvm.toml", vm.name).into())
}

/// The spec as it runs on `backend` (after `up --backend`, or where the VM was found).
fn with_backend(spec: &VmSpec, backend: &str) -> VmSpec {
    let mut spec = spec.clone();
    spec.backend = backend.to_string();
    spec
}

/// Every VM of every backend, plus the fleet's VMs that exist nowhere. A
/// backend that cannot be listed is reported, and its VMs are not shown as absent.
pub async fn list(
    shared: Arc<Shared>,
    configs: Vec<RemoteConfig>,
    specs: Vec<VmSpec>,
) -> Result<(Vec<VmStatus>, Vec<BackendFailure>), String> {
    let backends = backends(&shared, configs)
        .await
        .map_err(|e| format!("{e:#}"))?;
    tokio::task::spawn_blocking(move || {
        let mut rows: Vec<VmStatus> = Vec::new();
        let mut failed = Vec::new();
        for (name, backend) in backends.iter() {
            match backend.list(&specs) {
                Ok(list) => rows.extend(list),
                Err(e) => failed.push(BackendFailure {
                    backend: name.to_string(),
                    error: format!("{e:#}"),
                }),
            }
        }
        for spec in &specs {
            let listed = rows.iter().any(|r| r.name == spec.name.as_str());
            let unknown = failed.iter().any(|f| f.backend == spec.backend);
            if !listed && !unknown {
                rows.push(VmStatus::absent(
                    spec.name.as_str(),
                    &spec.backend,
                    Some(spec),
                ));
            }
        }
        rows.sort_by(|a, b| a.name.cmp(&b.name).then(a.backend.cmp(&b.backend)));
        (rows, failed)
    })
    .await
    .map_err(|e| format!("listing failed: {e}"))
}

/// Builds a flake image on this machine's image store.
pub async fn build_image(
    shared: Arc<Shared>,
    image: ImageSpec,
    rebuild: bool,
    tx: UnboundedSender<Reply>,
) -> Vec<VmResult> {
    let label = format!("image:{}", image.name);
    let guard = match shared.locks.acquire(&label, "image build", false).await {
        Ok(guard) => guard,
        Err(busy) => return vec![VmResult::failed(&label, ErrorKind::Busy, busy.to_string())],
    };
    let local = shared.registry.local().clone();
    let result = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let ImageSource::Flake(flake_ref) = &image.source else {
            return Err(anyhow!(
                "image {} is not a flake image: there is nothing to build",
                image.name
            )
            .into());
        };
        let (base, built) =
            local
                .store()
                .build_flake(image.name.as_str(), flake_ref, rebuild, &Events { tx })?;
        Ok(Outcome::Built(Built {
            digest: base.file.digest,
            path: base.file.path,
            built,
        }))
    })
    .await
    .unwrap_or_else(|e| Err(anyhow!("the build failed: {e}").into()));
    vec![VmResult::new(&label, result)]
}

/// Makes a template of an image on a backend from this machine's image store
/// (the image imported or built as `up` would, only once the backend asks for it).
pub async fn push_image(
    shared: Arc<Shared>,
    image: ImageSpec,
    backend_name: String,
    configs: Vec<RemoteConfig>,
    tx: UnboundedSender<Reply>,
) -> Vec<VmResult> {
    let label = format!("image:{}", image.name);
    if let ImageSource::Kernel { .. } = image.source {
        return vec![VmResult::failed(
            &label,
            ErrorKind::Unsupported,
            format!(
                "image {} boots a kernel directly: only disk images (`file` or `flake`) can be pushed",
                image.name
            ),
        )];
    }
    let backends = match backends(&shared, configs).await {
        Ok(backends) => backends,
        Err(e) => {
            return vec![VmResult::failed(
                &label,
                ErrorKind::Failed,
                format!("{e:#}"),
            )];
        }
    };
    // One push or build of an image at a time: both read its place in the store.
    let guard = match shared.locks.acquire(&label, "image push", false).await {
        Ok(guard) => guard,
        Err(busy) => return vec![VmResult::failed(&label, ErrorKind::Busy, busy.to_string())],
    };
    let local = shared.registry.local().clone();
    let result = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let events = Events { tx };
        let backend = backends.get(&backend_name)?;
        let disk = || {
            let prepared = local.store().prepare(&image, &events)?;
            prepared
                .base
                .ok_or_else(|| anyhow!("image {} has no disk to push", image.name))
        };
        let pushed = backend.push_image(&image, &disk, &events)?;
        Ok(Outcome::Pushed(PushedImage {
            image: image.name.to_string(),
            backend: backend_name,
            vmid: pushed.vmid,
            node: pushed.node,
            digest: pushed.digest,
            action: pushed.action,
        }))
    })
    .await
    .unwrap_or_else(|e| Err(anyhow!("the push failed: {e}").into()));
    vec![VmResult::new(&label, result)]
}
