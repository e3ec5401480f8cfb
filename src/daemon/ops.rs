//! The mutating operations, one VM per blocking task, all VMs of a request at once.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use super::Shared;
use super::protocol::{Event, Reply, Request, UpItem, VmRef, VmResult};
use crate::backend::libvirt::LocalBackend;
use crate::backend::{Backend, BackendError, DownPath, SnapshotAction, UpOutcome};
use crate::progress::Reporter;
use crate::spec::{ImageSource, ImageSpec};

/// What `up` reports for one VM.
#[derive(Debug, Serialize)]
pub struct UpResult {
    #[serde(flatten)]
    pub outcome: UpOutcome,
    /// Seconds from the end of `up` until SSH answered (when waited for).
    pub ssh_ready_seconds: Option<f64>,
}

#[derive(Serialize)]
struct Stopped {
    stopped_by: DownPath,
}

#[derive(Serialize)]
struct Destroyed {
    destroyed: bool,
}

/// Sends progress to the client as events.
struct Events {
    tx: UnboundedSender<Reply>,
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

type Op = Box<dyn FnOnce(&LocalBackend, &Events) -> Result<serde_json::Value, BackendError> + Send>;

pub async fn run(
    shared: Arc<Shared>,
    request: Request,
    tx: UnboundedSender<Reply>,
) -> Vec<VmResult> {
    let (verb, no_block, jobs): (&str, bool, Vec<(String, Op)>) = match request {
        Request::Up {
            vms,
            wait,
            timeout_secs,
            no_block,
        } => {
            let timeout = Duration::from_secs(timeout_secs);
            let jobs = jobs(
                vms,
                |item| item.spec.name.to_string(),
                |item| Box::new(move |b, events| up(b, &item, wait, timeout, events)),
            );
            ("up", no_block, jobs)
        }
        Request::Down {
            vms,
            force,
            timeout_secs,
            no_block,
        } => {
            let timeout = Duration::from_secs(timeout_secs);
            let jobs = jobs(
                vms,
                |vm| vm.name.clone(),
                |vm| Box::new(move |b, _| down(b, &vm, force, timeout)),
            );
            ("down", no_block, jobs)
        }
        Request::Destroy { vms, no_block } => {
            let jobs = jobs(
                vms,
                |vm| vm.name.clone(),
                |vm| Box::new(move |b, _| destroy(b, &vm)),
            );
            ("destroy", no_block, jobs)
        }
        Request::Snapshot {
            vm,
            action,
            no_block,
        } => {
            let jobs = jobs(
                vec![vm],
                |vm| vm.name.clone(),
                |vm| {
                    let action = action.clone();
                    Box::new(move |b, _| snapshot(b, &vm, &action))
                },
            );
            ("snapshot", no_block, jobs)
        }
        Request::ImageBuild { image, rebuild } => {
            let jobs = jobs(
                vec![image],
                |i| format!("image:{}", i.name),
                |image| Box::new(move |b, events| build_image(b, &image, rebuild, events)),
            );
            ("image build", false, jobs)
        }
        Request::Hello {} | Request::Events {} => return Vec::new(),
    };
    let mut tasks = Vec::new();
    for (name, op) in jobs {
        let shared = shared.clone();
        let tx = tx.clone();
        tasks.push((
            name.clone(),
            tokio::spawn(async move {
                let guard = shared.locks.acquire(&name, verb, no_block).await?;
                let backend = shared.backend.clone();
                tokio::task::spawn_blocking(move || {
                    let _guard = guard;
                    op(&backend, &Events { tx })
                })
                .await
                .map_err(|e| anyhow::anyhow!("the operation failed: {e}"))?
                .map_err(anyhow::Error::from)
            }),
        ));
    }
    let mut results = Vec::new();
    for (name, task) in tasks {
        let outcome = match task.await {
            Ok(result) => result,
            Err(e) => Err(anyhow::anyhow!("the operation failed: {e}")),
        };
        results.push(VmResult::from_result(&name, outcome));
    }
    results
}

/// One named job per item of a request.
fn jobs<T>(items: Vec<T>, name: impl Fn(&T) -> String, op: impl Fn(T) -> Op) -> Vec<(String, Op)> {
    items
        .into_iter()
        .map(|item| (name(&item), op(item)))
        .collect()
}

fn to_value<T: Serialize>(value: T) -> Result<serde_json::Value, BackendError> {
    serde_json::to_value(value).map_err(|e| BackendError::Other(e.into()))
}

fn up(
    backend: &LocalBackend,
    item: &UpItem,
    wait: bool,
    timeout: Duration,
    events: &Events,
) -> Result<serde_json::Value, BackendError> {
    let name = item.spec.name.as_str();
    let outcome = backend.up(&item.spec, Some(&item.image), events)?;
    let ssh_ready_seconds = if wait {
        let took = backend.wait_ready(name, timeout)?;
        events.step(name, &format!("ssh-ready in {:.1} s", took.as_secs_f64()));
        Some(took.as_secs_f64())
    } else {
        None
    };
    to_value(UpResult {
        outcome,
        ssh_ready_seconds,
    })
}

/// Refuses `action` on a readonly VM (by its spec, or its metadata without one).
fn check_writable(
    backend: &LocalBackend,
    vm: &VmRef,
    action: &'static str,
) -> Result<(), BackendError> {
    if backend.status(&vm.name, vm.spec.as_ref())?.readonly {
        return Err(BackendError::ReadOnly {
            name: vm.name.clone(),
            action,
        });
    }
    Ok(())
}

fn down(
    backend: &LocalBackend,
    vm: &VmRef,
    force: bool,
    timeout: Duration,
) -> Result<serde_json::Value, BackendError> {
    check_writable(backend, vm, "stop")?;
    let stopped_by = backend.down(&vm.name, force, timeout)?;
    to_value(Stopped { stopped_by })
}

fn destroy(backend: &LocalBackend, vm: &VmRef) -> Result<serde_json::Value, BackendError> {
    check_writable(backend, vm, "destroy")?;
    backend.destroy(&vm.name)?;
    to_value(Destroyed { destroyed: true })
}

/// Snapshots of a readonly VM may be made and listed, not reverted to or deleted.
fn snapshot(
    backend: &LocalBackend,
    vm: &VmRef,
    action: &SnapshotAction,
) -> Result<serde_json::Value, BackendError> {
    match action {
        SnapshotAction::Revert { .. } => check_writable(backend, vm, "revert a snapshot of")?,
        SnapshotAction::Delete { .. } => check_writable(backend, vm, "delete a snapshot of")?,
        SnapshotAction::Create { .. } | SnapshotAction::List => {}
    }
    to_value(backend.snapshot(&vm.name, action)?)
}

#[derive(Serialize)]
struct Built {
    digest: String,
    path: std::path::PathBuf,
    /// False when the flake and its lock file were unchanged since the last build.
    built: bool,
}

fn build_image(
    backend: &LocalBackend,
    image: &ImageSpec,
    rebuild: bool,
    events: &Events,
) -> Result<serde_json::Value, BackendError> {
    let ImageSource::Flake(flake_ref) = &image.source else {
        return Err(anyhow::anyhow!(
            "image {} is not a flake image: there is nothing to build",
            image.name
        )
        .into());
    };
    let (base, built) =
        backend
            .store()
            .build_flake(image.name.as_str(), flake_ref, rebuild, events)?;
    to_value(Built {
        digest: base.file.digest,
        path: base.file.path,
        built,
    })
}
