//! The local backend's `fork`: one live external snapshot of the source
//! (memory to a libvirt save image, its disk's top frozen as a read-only
//! layer with a new top above it), then per fork a thin overlay on that
//! layer, a domain defined from the saved XML with the fork's identity, and a
//! restore of the memory snapshot once its header names the fork (`saveimage`).
//!
//! Which layers a VM's disk sits on are in its metadata (`<agentvm:layer>`), so
//! `destroy` finds the VMs that depend on a VM's folder by reading every
//! domain's metadata.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use virt::sys;

use super::fork_memory::MemoryFiles;
use super::fork_snapshot::{remove_file, snapshot};
use super::fork_xml::{ForkIdentity, rewrite, with_uuid, without_backing_stores};
use super::saveimage::SaveImage;
use super::{LocalBackend, lv};
use crate::backend::{Forked, ForkedVm, Forks, Result};
use crate::domain::{self, VmState};
use crate::fsutil::{FileLock, create_private_dir, write_atomic};
use crate::image::qemu_img::{self, DiskFormat};
use crate::paths::{self, Home};
use crate::ports::{self, SPICE_PORT_BASE, SSH_PORT_BASE};
use crate::progress::Reporter;

/// How many forks are restored at once (each starts a QEMU and reads the
/// memory snapshot).
const PARALLEL_RESTORES: usize = 4;

/// The writable top of the disk of the VM `state` describes.
pub(super) fn top_disk(home: &Home, state: &VmState) -> PathBuf {
    match &state.disk {
        Some(file) => home.vm_dir(&state.name).join(file),
        None => home.vm_disk(&state.name),
    }
}

impl LocalBackend {
    /// The VMs whose disks sit on a layer in `name`'s folder (directly or
    /// through forks of its forks: each VM records its whole chain), sorted.
    pub(super) fn layer_dependents(&self, name: &str) -> Result<Vec<String>> {
        let dir = self.home.vm_dir(name);
        let mut found: Vec<String> = self
            .all_domains()?
            .into_iter()
            .map(|(_, state)| state)
            .filter(|state| state.name != name)
            .filter(|state| {
                state
                    .layers
                    .iter()
                    .any(|layer| Path::new(layer).starts_with(&dir))
            })
            .map(|state| state.name)
            .collect();
        found.sort();
        Ok(found)
    }

    /// Refuses fork names that are invalid, repeated or taken.
    fn check_fork_names(&self, source: &str, new: &[String]) -> Result<()> {
        if new.is_empty() {
            return Err(anyhow!("fork needs at least one name for a new VM").into());
        }
        for (i, name) in new.iter().enumerate() {
            crate::spec::Name::new(name).map_err(|e| anyhow!("{name}: {e}"))?;
            if name == source || new[..i].contains(name) {
                return Err(anyhow!("{name} is named twice in the fork").into());
            }
            if self.lookup(name)?.is_some() {
                return Err(anyhow!("a VM named {name} already exists").into());
            }
            let dir = self.home.vm_dir(name);
            if dir.exists() {
                return Err(anyhow!(
                    "{} exists although no VM {name} does; remove it or pick another name",
                    dir.display()
                )
                .into());
            }
        }
        Ok(())
    }

    /// Makes, defines and restores each fork from the memory snapshot; on
    /// error the forks made so far are removed again.
    fn restore_forks(
        &self,
        source: &VmState,
        layer: &Path,
        files: &MemoryFiles,
        new: &[String],
        progress: &dyn Reporter,
    ) -> Result<Vec<ForkedVm>> {
        let mut made = Vec::new();
        let result = self.restore_forks_into(source, layer, files, new, progress, &mut made);
        if result.is_err() {
            for name in &made {
                if let Err(e) = crate::backend::Lifecycle::remove(self, name) {
                    tracing::warn!("{name}: removing the half-made fork: {e}");
                }
            }
        }
        result
    }

    fn restore_forks_into(
        &self,
        source: &VmState,
        layer: &Path,
        files: &MemoryFiles,
        new: &[String],
        progress: &dyn Reporter,
        made: &mut Vec<String>,
    ) -> Result<Vec<ForkedVm>> {
        let memory = files.file(&source.name, &self.home.vm_dir(&source.name));
        let memory = memory.as_path();
        let image = SaveImage::read(memory)?;
        // Held from choosing ports until the domains (which claim them) are defined.
        let ports_guard = FileLock::acquire(&paths::lock_file()?)?;
        let mut claims = self.claims("")?;
        let mut pending = Vec::new();
        for name in new {
            let mut pick = |kind, base| {
                let port = ports::choose(kind, base, name, None, None, &claims)
                    .map_err(|e| anyhow!("{name}: {e}"))?;
                claims.add(port, &format!("{name} ({kind})"));
                Ok::<_, anyhow::Error>(port)
            };
            let ports = (pick("ssh", SSH_PORT_BASE)?, pick("spice", SPICE_PORT_BASE)?);
            made.push(name.clone());
            let xml = self.define_fork(source, layer, &image, name, ports)?;
            pending.push((name, xml, ports));
        }
        drop(ports_guard);
        let conn = self.conn()?;
        let last = pending.len().saturating_sub(1);
        let mut forks = Vec::new();
        // Restores run side by side, a few at a time, each from its own copy
        // of the memory file (the last from the file itself) whose header
        // names that fork.
        let restored = super::par_map(
            pending.into_iter().enumerate().collect(),
            PARALLEL_RESTORES,
            |(i, (name, xml, ports))| {
                let file = if i == last {
                    memory.to_path_buf()
                } else {
                    files.file(name, &self.home.vm_dir(name))
                };
                let restored = restore_one(&conn, &image, memory, &file, source, name, &xml);
                if file != memory {
                    remove_file(&file);
                }
                restored.map(|took| (name, ports, took))
            },
        );
        for result in restored {
            let (name, (ssh_port, spice_port), took) = result?;
            progress.step(
                name,
                &format!(
                    "restored from {} in {:.1} s (ssh port {ssh_port})",
                    source.name,
                    took.as_secs_f64()
                ),
            );
            // The saved XML is the source's live one: a source whose
            // system was changed since it started still boots its
            // image's kernel there, but its disk (and the fork's) holds
            // another system. The fork's next start boots from its disk.
            if source.boot.as_deref() == Some(domain::BOOT_DISK) {
                crate::backend::Lifecycle::system_changed(self, name)?;
            }
            forks.push(ForkedVm {
                name: name.clone(),
                ssh_port,
                spice_port,
                ssh_ready_seconds: None,
                new_identity: false,
                host_key_pinned: self.home.vm_pinned_host_key(name).is_file(),
            });
        }
        Ok(forks)
    }

    /// Makes fork `name`'s folder, disk and files and defines its domain;
    /// returns the XML (with its UUID) to restore it with.
    fn define_fork(
        &self,
        source: &VmState,
        layer: &Path,
        image: &SaveImage,
        name: &str,
        (ssh_port, spice_port): (u16, u16),
    ) -> anyhow::Result<String> {
        let home = &self.home;
        let dir = home.vm_dir(name);
        create_private_dir(&dir)?;
        qemu_img::create_overlay(layer, DiskFormat::Qcow2, &home.vm_disk(name), None)?;
        let src = source.name.as_str();
        for (from, to) in [
            (home.vm_env_file(src), home.vm_env_file(name)),
            (home.vm_seed(src), home.vm_seed(name)),
        ] {
            if from.is_file() {
                let data =
                    std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
                write_atomic(&to, &data, 0o600)?;
            }
        }
        self.copy_pinned_key(src, name)?;

        let mut fork = source.clone();
        fork.name = name.to_string();
        fork.ssh_port = ssh_port;
        fork.spice_port = spice_port;
        fork.forwards.clear();
        fork.disk = None;
        fork.layers.push(layer.to_string_lossy().into_owned());
        fork.forked_from = Some(src.to_string());
        fork.home = Some(self.home_key.clone());
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let runtime = &self.runtime_dir;
        let identity = ForkIdentity {
            source,
            fork: &fork,
            disk: (path(layer.to_path_buf()), path(home.vm_disk(name))),
            paths: vec![
                (
                    path(home.vm_serial_log(src)),
                    path(home.vm_serial_log(name)),
                ),
                (path(home.vm_env_file(src)), path(home.vm_env_file(name))),
                (path(home.vm_seed(src)), path(home.vm_seed(name))),
                (
                    path(domain::guest_agent_socket(runtime, src)),
                    path(domain::guest_agent_socket(runtime, name)),
                ),
            ],
        };
        let xml = without_backing_stores(&rewrite(image.xml(), &identity)?)?;
        let dom = self
            .define_xml(&xml)
            .with_context(|| format!("defining {}", domain::domain_name(name)))?;
        let uuid = dom
            .uuid_string()
            .map_err(lv)
            .context("reading the fork's UUID")?;
        with_uuid(&xml, &uuid)
    }

    /// Pins the source's host key for the fork (its guest has the same key).
    fn copy_pinned_key(&self, source: &str, name: &str) -> anyhow::Result<()> {
        let pinned = self.home.vm_pinned_host_key(source);
        let key = match std::fs::read_to_string(&pinned) {
            Ok(key) => key,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", pinned.display())),
        };
        let key = key.trim();
        write_atomic(
            &self.home.vm_known_hosts(name),
            format!("{}{name} {key}\n", domain::DOMAIN_PREFIX).as_bytes(),
            0o600,
        )?;
        write_atomic(
            &self.home.vm_pinned_host_key(name),
            format!("{key}\n").as_bytes(),
            0o600,
        )
    }
}

impl Forks for LocalBackend {
    fn fork(&self, source: &str, new: &[String], progress: &dyn Reporter) -> Result<Forked> {
        self.check_fork_names(source, new)?;
        let (dom, state) = self.require_running(source)?;
        if !state.shares.is_empty() {
            return Err(anyhow!(
                "{source} has shared folders: QEMU cannot save the share devices' state with \
                 the memory, so it cannot be forked while they are attached"
            )
            .into());
        }
        if state.egress.is_some() {
            return Err(anyhow!(
                "{source} has an egress policy: forks of it are not supported (its proxy \
                 tunnel is per VM); agentvm up a new VM instead"
            )
            .into());
        }
        if state.network != domain::NetworkMode::Slirp.as_str() {
            return Err(anyhow!(
                "{source} runs on {} networking: only VMs on SLIRP can be forked",
                state.network
            )
            .into());
        }
        let layer = top_disk(&self.home, &state);
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let new_top = self.home.vm_fork_top(source, stamp);
        let guest_bytes = dom
            .max_memory()
            .map_err(lv)
            .context("reading the VM's memory size")?
            .saturating_mul(1024);
        let mut files = MemoryFiles::choose(&self.runtime_dir, guest_bytes, new.len() as u64);
        let mut memory = files.file(source, &self.home.vm_dir(source));
        remove_file(&memory);
        let taken = match snapshot(&dom, source, &memory, &new_top) {
            // RAM may have filled up since it was checked (another fork, say):
            // the disk is slower, but has room.
            Err(e) if files.in_ram() => {
                tracing::warn!("{source}: snapshot to RAM failed ({e}); writing it to disk");
                files = MemoryFiles::on_disk();
                memory = files.file(source, &self.home.vm_dir(source));
                remove_file(&memory);
                snapshot(&dom, source, &memory, &new_top)?
            }
            taken => taken?,
        };
        // Removed however the fork ends (in RAM, nothing else would remove it).
        let _memory_file = RemovedOnDrop(&memory);
        tracing::debug!(
            "{source}: memory snapshot in {} (in RAM: {})",
            memory.display(),
            files.in_ram()
        );
        progress.step(
            source,
            &format!(
                "snapshot of {source} taken in {:.1} s (paused {:.2} s)",
                taken.seconds, taken.paused_seconds
            ),
        );
        let mut recorded = state.clone();
        recorded.disk = new_top
            .file_name()
            .map(|f| f.to_string_lossy().into_owned());
        recorded.layers.push(layer.to_string_lossy().into_owned());
        super::forwards::write_state(&dom, &recorded).with_context(|| {
            format!(
                "{source} now writes to {}, but recording it in its metadata failed",
                new_top.display()
            )
        })?;
        // Nothing may write to a layer others sit on.
        if let Err(e) =
            std::fs::set_permissions(&layer, std::os::unix::fs::PermissionsExt::from_mode(0o400))
        {
            tracing::warn!("{source}: making {} read-only: {e}", layer.display());
        }
        let forks = self.restore_forks(&state, &layer, &files, new, progress);
        Ok(Forked {
            snapshot_seconds: taken.seconds,
            paused_seconds: taken.paused_seconds,
            vms: forks?,
        })
    }

    fn flatten(&self, name: &str, progress: &dyn Reporter) -> Result<Vec<String>> {
        self.require(name)?;
        let dependents = self.layer_dependents(name)?;
        let mut running = Vec::new();
        for dependent in &dependents {
            if self.require(dependent)?.0.is_active().map_err(lv)? {
                running.push(dependent.as_str());
            }
        }
        if !running.is_empty() {
            return Err(anyhow!(
                "flattening needs the VMs that sit on {name}'s disk stopped: {} (agentvm down {})",
                running.join(", "),
                running.join(" ")
            )
            .into());
        }
        for dependent in &dependents {
            let (dom, mut state) = self.require(dependent)?;
            let bottom = state
                .layers
                .first()
                .with_context(|| format!("{dependent} records no layers"))?;
            let base = qemu_img::backing_file(Path::new(bottom))?
                .with_context(|| format!("{bottom} has no backing image"))?;
            let format = qemu_img::info(&base)?.format;
            progress.step(
                dependent,
                "copying what it needs of the shared layers into its own disk",
            );
            qemu_img::rebase(&top_disk(&self.home, &state), &base, format)?;
            state.layers.clear();
            super::forwards::write_state(&dom, &state)?;
            // libvirt keeps the chain an external snapshot found in the
            // definition; without it, the next start reads the new one.
            let xml = dom
                .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
                .map_err(lv)
                .context("reading the domain definition")?;
            self.define_xml(&without_backing_stores(&xml)?)
                .with_context(|| format!("redefining {dependent} without its old layers"))?;
            progress.step(dependent, &format!("flattened onto {}", base.display()));
        }
        Ok(dependents)
    }
}

/// Restores fork `name` from `file`: a copy of the memory snapshot `memory`
/// (unless it is that file) with its header rewritten to `xml`. Returns how
/// long it took.
fn restore_one(
    conn: &virt::connect::Connect,
    image: &SaveImage,
    memory: &Path,
    file: &Path,
    source: &VmState,
    name: &str,
    xml: &str,
) -> anyhow::Result<Duration> {
    let began = Instant::now();
    if file != memory {
        std::fs::copy(memory, file).with_context(|| {
            format!(
                "copying {} to {} for {name}",
                memory.display(),
                file.display()
            )
        })?;
    }
    image.write_xml(file, xml)?;
    conn.restore_domain(&file.to_string_lossy())
        .map_err(lv)
        .with_context(|| format!("restoring {name} from {}'s memory", source.name))?;
    Ok(began.elapsed())
}

/// A file removed when this is dropped.
struct RemovedOnDrop<'a>(&'a Path);

impl Drop for RemovedOnDrop<'_> {
    fn drop(&mut self) {
        remove_file(self.0);
    }
}
