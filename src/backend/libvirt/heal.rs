//! The local backend as the daemon holds it: every step goes through here, and
//! here is decided what happens when libvirt's connection dies during one.
//!
//! - Steps that only read (find, status, list, states, plan, waits, …) are run
//!   again once on a new connection: the caller never sees the restart.
//! - Steps that change a VM are not repeated (the change may or may not have
//!   happened): they fail with [`BackendError::Interrupted`], which says what was
//!   being done and the VM's state as the new connection reads it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{LocalBackend, conn};
use crate::backend::{
    BackendError, DiskSource, Display, ExecOutcome, Existing, ForwardChange, ForwardStatus,
    Forwards, GuestAgent, HostKey, Lifecycle, Plan, Prepared, Pushed, Result, SnapshotAction,
    SnapshotInfo, Snapshots, SpiceAccess, State, Stream, Templates, Timings, VmStatus,
};
use crate::image::ImageStore;
use crate::progress::Reporter;
use crate::spec::{ImageSpec, VmSpec};
use crate::ssh::Endpoint;

/// `wait_agent` waits in slices this long, so a connection that died during
/// the wait is replaced before the deadline rather than after it.
const AGENT_WAIT_SLICE: Duration = Duration::from_secs(5);

/// [`LocalBackend`] with reconnection: what the daemon's registry holds.
pub struct Healing {
    inner: Arc<LocalBackend>,
}

impl Healing {
    pub fn new(inner: LocalBackend) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    pub fn store(&self) -> &ImageStore {
        self.inner.store()
    }

    /// See [`LocalBackend::reconcile`]; read-only until it repairs, so retried.
    pub fn reconcile(&self) -> Result<Vec<String>> {
        self.read(|| self.inner.reconcile())
    }

    /// Runs a step that only reads; if the connection died while it ran, runs
    /// it again on a new one.
    fn read<T>(&self, step: impl Fn() -> Result<T>) -> Result<T> {
        let generation = self.inner.libvirt.generation();
        let first = step();
        if !self.inner.libvirt.died_since(generation) {
            return first;
        }
        if let Err(e) = &first {
            tracing::info!("libvirt went away during a read ({e}); reconnecting and reading again");
        }
        let (_, generation) = self.inner.libvirt.reconnect()?;
        let again = step();
        if again.is_err() && self.inner.libvirt.died_since(generation) {
            return Err(anyhow::anyhow!("{}; run the command again", conn::LOST).into());
        }
        again
    }

    /// Runs a step that changes VM `name` (`doing` says what, as in "starting");
    /// if the connection died while it ran, fails with what state it left.
    fn change<T>(&self, name: &str, doing: &str, step: impl FnOnce() -> Result<T>) -> Result<T> {
        let generation = self.inner.libvirt.generation();
        let result = step();
        match result {
            Err(e) if self.inner.libvirt.died_since(generation) => {
                tracing::warn!("libvirt went away while {doing} VM {name}: {e}");
                Err(self.interrupted(name, doing))
            }
            other => other,
        }
    }

    fn interrupted(&self, name: &str, doing: &str) -> BackendError {
        if let Err(e) = self.inner.libvirt.reconnect() {
            return BackendError::Interrupted(format!(
                "lost the connection to libvirt while {doing} VM {name}: {e:#}"
            ));
        }
        let now = match self.inner.find(name) {
            Ok(Some(Existing { running: true, .. })) => "running".to_string(),
            Ok(Some(_)) => "stopped".to_string(),
            Ok(None) => "not defined".to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        BackendError::Interrupted(format!(
            "lost the connection to libvirt while {doing} VM {name}; libvirt has restarted — run the command again; the VM is {now}"
        ))
    }
}

impl Lifecycle for Healing {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn find(&self, name: &str) -> Result<Option<Existing>> {
        self.read(|| self.inner.find(name))
    }

    fn prepare(
        &self,
        spec: &VmSpec,
        image: Option<&ImageSpec>,
        progress: &dyn Reporter,
    ) -> Result<Prepared> {
        self.read(|| self.inner.prepare(spec, image, progress))
    }

    fn create(
        &self,
        spec: &VmSpec,
        prepared: &Prepared,
        timings: &mut Timings,
        progress: &dyn Reporter,
    ) -> Result<()> {
        self.change(spec.name.as_str(), "creating", || {
            self.inner.create(spec, prepared, timings, progress)
        })
    }

    fn reconfigure(
        &self,
        spec: &VmSpec,
        prepared: &Prepared,
        existing: &Existing,
        timings: &mut Timings,
        progress: &dyn Reporter,
    ) -> Result<bool> {
        self.change(spec.name.as_str(), "redefining", || {
            self.inner
                .reconfigure(spec, prepared, existing, timings, progress)
        })
    }

    fn start(&self, name: &str, progress: &dyn Reporter) -> Result<()> {
        self.change(name, "starting", || self.inner.start(name, progress))
    }

    fn is_running(&self, name: &str) -> Result<bool> {
        self.read(|| self.inner.is_running(name))
    }

    fn wait_ssh(&self, name: &str, deadline: Instant) -> Result<()> {
        self.read(|| self.inner.wait_ssh(name, deadline))
    }

    fn wait_stopped(&self, name: &str, deadline: Instant) -> Result<bool> {
        self.read(|| self.inner.wait_stopped(name, deadline))
    }

    fn system_changed(&self, name: &str) -> Result<Option<String>> {
        self.change(name, "changing how it boots", || {
            self.inner.system_changed(name)
        })
    }

    fn acpi_shutdown(&self, name: &str) -> Result<()> {
        self.change(name, "shutting down", || self.inner.acpi_shutdown(name))
    }

    fn force_off(&self, name: &str) -> Result<()> {
        self.change(name, "forcing off", || self.inner.force_off(name))
    }

    fn remove(&self, name: &str) -> Result<()> {
        self.change(name, "destroying", || self.inner.remove(name))
    }

    fn status(&self, name: &str, spec: Option<&VmSpec>) -> Result<VmStatus> {
        self.read(|| self.inner.status(name, spec))
    }

    fn list(&self, specs: &[VmSpec]) -> Result<Vec<VmStatus>> {
        self.read(|| self.inner.list(specs))
    }

    fn states(&self) -> Result<Vec<(String, State)>> {
        self.read(|| self.inner.states())
    }

    fn plan(&self, spec: &VmSpec, image: Option<&ImageSpec>) -> Result<Plan> {
        self.read(|| self.inner.plan(spec, image))
    }

    fn ssh_endpoint(&self, name: &str) -> Result<Endpoint> {
        self.read(|| self.inner.ssh_endpoint(name))
    }

    fn env_stale(&self, spec: &VmSpec) -> Result<bool> {
        self.read(|| self.inner.env_stale(spec))
    }
}

impl GuestAgent for Healing {
    fn agent_expected(&self, name: &str) -> Result<bool> {
        self.read(|| self.inner.agent_expected(name))
    }

    fn wait_agent(&self, name: &str, deadline: Instant) -> Result<()> {
        loop {
            let slice = deadline.min(Instant::now() + AGENT_WAIT_SLICE);
            match self.read(|| self.inner.wait_agent(name, slice)) {
                // The slice ran out (not the wait): try the next one.
                Err(_) if Instant::now() >= slice && slice < deadline => {}
                done => return done,
            }
        }
    }

    fn agent_shutdown(&self, name: &str) -> Result<()> {
        self.change(name, "shutting down", || self.inner.agent_shutdown(name))
    }

    fn exec(
        &self,
        name: &str,
        argv: &[String],
        stdin: Option<&[u8]>,
        timeout: Duration,
        output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        self.change(name, "running a command in", || {
            self.inner.exec(name, argv, stdin, timeout, output)
        })
    }

    fn host_key(&self, name: &str) -> Result<HostKey> {
        self.read(|| self.inner.host_key(name))
    }

    fn sync_clock(&self, name: &str) -> Result<i64> {
        // Setting the clock to now again is harmless: it may be retried.
        self.read(|| self.inner.sync_clock(name))
    }

    fn read_file(&self, name: &str, path: &str) -> Result<Vec<u8>> {
        self.read(|| self.inner.read_file(name, path))
    }

    fn write_file(&self, name: &str, path: &str, data: &[u8], mode: Option<u32>) -> Result<()> {
        self.change(name, "writing a file in", || {
            self.inner.write_file(name, path, data, mode)
        })
    }

    fn read_file_range(
        &self,
        name: &str,
        path: &str,
        offset: u64,
        length: usize,
    ) -> Result<Vec<u8>> {
        self.read(|| self.inner.read_file_range(name, path, offset, length))
    }

    fn append_file(&self, name: &str, path: &str, data: &[u8]) -> Result<()> {
        self.change(name, "writing a file in", || {
            self.inner.append_file(name, path, data)
        })
    }
}

impl Snapshots for Healing {
    fn snapshot(&self, name: &str, action: &SnapshotAction) -> Result<Vec<SnapshotInfo>> {
        let doing = match action {
            SnapshotAction::List => return self.read(|| self.inner.snapshot(name, action)),
            SnapshotAction::Create { .. } => "snapshotting",
            SnapshotAction::Revert { .. } => "reverting",
            SnapshotAction::Delete { .. } => "deleting a snapshot of",
        };
        self.change(name, doing, || self.inner.snapshot(name, action))
    }
}

impl Display for Healing {
    fn serial_log(&self, name: &str) -> Result<PathBuf> {
        self.read(|| self.inner.serial_log(name))
    }

    fn spice(&self, name: &str) -> Result<SpiceAccess> {
        self.read(|| self.inner.spice(name))
    }

    fn screenshot(&self, name: &str, png: &Path) -> Result<(u32, u32)> {
        self.read(|| self.inner.screenshot(name, png))
    }
}

impl Forwards for Healing {
    fn forward(&self, name: &str, change: &ForwardChange) -> Result<Vec<ForwardStatus>> {
        match change {
            ForwardChange::List => self.read(|| self.inner.forward(name, change)),
            ForwardChange::Add { .. } => self.change(name, "adding a forward to", || {
                self.inner.forward(name, change)
            }),
            ForwardChange::Remove { .. } => self.change(name, "removing a forward from", || {
                self.inner.forward(name, change)
            }),
        }
    }
}

impl crate::backend::Shares for Healing {
    fn mount_shares(&self, name: &str, progress: &dyn Reporter) -> Result<()> {
        self.read(|| self.inner.mount_shares(name, progress))
    }

    fn share_problems(&self) -> Result<Vec<(String, String)>> {
        self.read(|| self.inner.share_problems())
    }
}

impl Templates for Healing {
    /// Refused without touching libvirt, so nothing to heal.
    fn push_image(
        &self,
        image: &ImageSpec,
        disk: DiskSource<'_>,
        progress: &dyn Reporter,
    ) -> Result<Pushed> {
        self.inner.push_image(image, disk, progress)
    }
}

impl crate::backend::Forks for Healing {
    fn fork(
        &self,
        source: &str,
        new: &[String],
        progress: &dyn Reporter,
    ) -> Result<crate::backend::Forked> {
        self.change(source, "forking", || self.inner.fork(source, new, progress))
    }

    fn flatten(&self, name: &str, progress: &dyn Reporter) -> Result<Vec<String>> {
        self.change(name, "flattening the forks of", || {
            self.inner.flatten(name, progress)
        })
    }
}
