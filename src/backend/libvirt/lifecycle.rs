//! The local backend's `Lifecycle` role: find, prepare, create, reconfigure,
//! start and stop, remove, status, list and plan, from the steps in
//! `define.rs`.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use virt::sys;

use super::{LocalBackend, Target, image_name, live_state, log_tail, lv, remove_dir};
use crate::backend::{
    BackendError, Change, Existing, Lifecycle, Plan, Prepared, Result, State, Timings, VmStatus,
};
use crate::domain;
use crate::failpoint;
use crate::fsutil::FileLock;
use crate::guest::Guest;
use crate::image::{PreparedImage, qemu_img};
use crate::paths;
use crate::ports;
use crate::progress::Reporter;
use crate::spec::{ImageSpec, LOCAL_BACKEND, Size, VmSpec};
use crate::ssh::{self, Endpoint};

/// How often a wait on libvirt events checks anyway (an event can be missed
/// across a libvirtd restart).
const EVENT_FALLBACK_POLL: Duration = Duration::from_millis(250);

/// Size of the blank disk a kernel-boot VM without a `file` and a `disk` gets.
pub const DEFAULT_BLANK_DISK: Size = Size::from_bytes(8 * crate::spec::GIB);

/// What `prepare` hands `create`/`reconfigure` on this backend.
struct LocalPrepared {
    image: PreparedImage,
    target: Target,
}

impl Lifecycle for LocalBackend {
    fn kind(&self) -> &'static str {
        "libvirt"
    }

    fn find(&self, name: &str) -> Result<Option<Existing>> {
        let Some((dom, state)) = self.lookup(name)? else {
            return Ok(None);
        };
        Ok(Some(Existing {
            running: dom.is_active().map_err(lv).context("asking libvirt")?,
            readonly: state.readonly,
            ssh_port: Some(state.ssh_port),
            spice_port: Some(state.spice_port),
            egress: state.egress(),
            spec_hash: state.spec_hash,
        }))
    }

    fn prepare(
        &self,
        spec: &VmSpec,
        image: Option<&ImageSpec>,
        progress: &dyn Reporter,
    ) -> Result<Prepared> {
        let name = spec.name.as_str();
        let image = image.ok_or_else(|| {
            anyhow!("{name}: a VM on the local backend needs an image (set image = \"…\" in [vms.{name}] or [defaults])")
        })?;
        let prepared = self.store.prepare(image, progress)?;
        let target = self.target(spec, Some(image))?;
        Ok(Prepared::new(
            target.hash.clone(),
            LocalPrepared {
                image: prepared,
                target,
            },
        ))
    }

    fn create(
        &self,
        spec: &VmSpec,
        prepared: &Prepared,
        timings: &mut Timings,
        progress: &dyn Reporter,
    ) -> Result<()> {
        let local: &LocalPrepared = prepared.data();
        progress.step(
            spec.name.as_str(),
            &format!(
                "creating ({} with {})",
                local.target.accel.as_str(),
                local.target.network.as_str()
            ),
        );
        self.create_domain(spec, &local.image, &local.target, timings, progress)
    }

    fn reconfigure(
        &self,
        spec: &VmSpec,
        prepared: &Prepared,
        existing: &Existing,
        timings: &mut Timings,
        progress: &dyn Reporter,
    ) -> Result<bool> {
        let name = spec.name.as_str();
        let local: &LocalPrepared = prepared.data();
        let (dom, state) = self.require(name)?;
        if state.image_digest != local.image.digest {
            progress.step(
                name,
                &format!(
                    "image {} changed since this VM was made; the VM keeps its old base (destroy and up to use the new one)",
                    image_name(spec)
                ),
            );
        }
        // The VM is stopped: its next start reads the env and seed from these files.
        self.write_guest_files(spec, &local.target)?;
        let spec_changed = existing.spec_hash != prepared.spec_hash;
        let ports_guard = FileLock::acquire(&paths::lock_file()?)?;
        let (ssh_port, spice_port) = self.ports_for(spec, Some(&state))?;
        let moved = (ssh_port, spice_port) != (state.ssh_port, state.spice_port);
        if !spec_changed && !moved {
            return Ok(false);
        }
        if moved {
            progress.step(
                name,
                &format!("ports now ssh {ssh_port}, spice {spice_port} (the old ones are taken)"),
            );
        }
        // A forked VM writes to its own top above a shared layer.
        let top = super::fork::top_disk(&self.home, &state);
        self.resize_disk(spec, &top)?;
        super::forwards::say_dropped(name, &super::forwards::live_forwards(&state), progress);
        let mut plan = self.domain_plan(
            spec,
            &local.image,
            &local.target,
            (ssh_port, spice_port),
            &state.image_digest,
            Some(&state),
        );
        plan.disk = top;
        plan.state.disk = state.disk.clone();
        plan.state.layers = state.layers.clone();
        plan.state.forked_from = state.forked_from.clone();
        plan.uuid = Some(
            dom.uuid_string()
                .map_err(lv)
                .context("reading the domain UUID")?,
        );
        timings.mark("overlay");
        self.define(&plan)?;
        drop(ports_guard);
        timings.mark("define");
        Ok(true)
    }

    fn start(&self, name: &str, progress: &dyn Reporter) -> Result<()> {
        let (dom, state) = self.require(name)?;
        self.drop_live_forwards(&dom, &state, progress)?;
        // QEMU would fail on a taken forward with a less helpful message.
        for forward in state
            .forwards
            .iter()
            .filter(|f| !f.live)
            .map(|f| f.forward())
        {
            if !ports::is_free_on(forward.host_addr, forward.host_port) {
                return Err(anyhow!(
                    "{name}: {}",
                    ports::PortError::ForwardBusy {
                        forward,
                        holder: ports::holder_of(forward.host_port),
                    }
                )
                .into());
            }
        }
        self.start_share_servers(&state)?;
        self.start_domain(&dom, name)
            .inspect_err(|_| self.stop_share_servers(&state))
    }

    fn is_running(&self, name: &str) -> Result<bool> {
        let (dom, _) = self.require(name)?;
        Ok(dom.is_active().map_err(lv).context("asking libvirt")?)
    }

    fn system_changed(&self, name: &str) -> Result<Option<String>> {
        let (dom, mut state) = self.require(name)?;
        // Only VMs of images whose disk boots by itself have a boot mode.
        if state.boot.is_none() {
            return Ok(None);
        }
        let xml = dom
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
            .map_err(lv)
            .context("reading the domain definition")?;
        // The definition decides (a fork of a provisioned VM may carry its
        // source's direct boot although its metadata says disk).
        let direct = xml.contains("<kernel>");
        if !direct && state.boot.as_deref() == Some(domain::BOOT_DISK) {
            return Ok(None);
        }
        if direct {
            self.define_xml(&domain::without_direct_boot(&xml)?)
                .with_context(|| format!("redefining {name} to boot from its disk"))?;
        }
        // Recorded once the definition boots from the disk, so a failure
        // between the two leaves `direct`, and the next call does it again.
        state.boot = Some(domain::BOOT_DISK.to_string());
        super::forwards::write_state(&dom, &state)?;
        Ok(Some(domain::BOOT_DISK.to_string()))
    }

    fn wait_stopped(&self, name: &str, deadline: Instant) -> Result<bool> {
        let (dom, _) = self.require(name)?;
        let stopped = super::events::wait_for(
            &domain::domain_name(name),
            deadline,
            EVENT_FALLBACK_POLL,
            || -> Result<Option<()>> {
                let active = dom.is_active().map_err(lv).context("asking libvirt")?;
                Ok((!active).then_some(()))
            },
        )?;
        Ok(stopped.is_some())
    }

    fn wait_ssh(&self, name: &str, deadline: Instant) -> Result<()> {
        let (dom, state) = self.require(name)?;
        let timeout = deadline.saturating_duration_since(Instant::now());
        ssh::wait_for_banner(state.ssh_port, timeout, || {
            dom.is_active().map_err(lv).context("asking libvirt")
        })
        .map_err(|e| {
            let log = self.home.vm_serial_log(name);
            let tail = log_tail(&log);
            if tail.is_empty() {
                anyhow!(
                    "{name}: {e}\nits serial console log ({}) is empty or missing",
                    log.display()
                )
            } else {
                anyhow!("{name}: {e}{tail}")
            }
        })?;
        Ok(())
    }

    fn acpi_shutdown(&self, name: &str) -> Result<()> {
        let (dom, _) = self.require_running(name)?;
        Guest::new(&dom)
            .monitor(qapi::qmp::system_powerdown {})
            .map_err(|e| anyhow!("{name}: system_powerdown: {e}"))?;
        Ok(())
    }

    fn force_off(&self, name: &str) -> Result<()> {
        let (dom, _) = self.require(name)?;
        dom.destroy()
            .map_err(lv)
            .with_context(|| format!("forcing {name} off"))?;
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<()> {
        let dir = self.home.vm_dir(name);
        match self.lookup(name)? {
            Some((dom, state)) => {
                let dependents = self.layer_dependents(name)?;
                if !dependents.is_empty() {
                    return Err(anyhow!(
                        "{name} cannot be destroyed: {} forked from it and still sit on its disk; destroy {} first",
                        dependents.join(", "),
                        if dependents.len() == 1 { "it" } else { "them" }
                    )
                    .into());
                }
                if dom.is_active().map_err(lv).context("asking libvirt")? {
                    dom.destroy()
                        .map_err(lv)
                        .with_context(|| format!("stopping {name}"))?;
                }
                self.stop_share_servers(&state);
                failpoint::hit("destroy:stopped");
                dom.undefine_flags(
                    sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                        | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                        | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA,
                )
                .map_err(lv)
                .with_context(|| format!("undefining {name}"))?;
                failpoint::hit("destroy:undefined");
            }
            None if !dir.exists() => return Err(BackendError::NotFound(name.to_string())),
            None => {}
        }
        remove_dir(&dir)?;
        Ok(())
    }

    fn status(&self, name: &str, spec: Option<&VmSpec>) -> Result<VmStatus> {
        match self.lookup(name)? {
            Some((dom, state)) => self.status_of(&dom, &state, spec),
            None => Ok(VmStatus::absent(name, LOCAL_BACKEND, spec)),
        }
    }

    fn list(&self, specs: &[VmSpec]) -> Result<Vec<VmStatus>> {
        super::par_map(
            self.managed_domains()?,
            super::PARALLEL_QUESTIONS,
            |(dom, state)| {
                let spec = specs.iter().find(|s| s.name.as_str() == state.name);
                self.status_of(&dom, &state, spec)
            },
        )
        .into_iter()
        .collect()
    }

    fn states(&self) -> Result<Vec<(String, State)>> {
        super::par_map(
            self.managed_domains()?,
            super::PARALLEL_QUESTIONS,
            |(dom, state)| Ok((state.name.clone(), live_state(&dom)?)),
        )
        .into_iter()
        .collect()
    }

    fn plan(&self, spec: &VmSpec, _image: Option<&ImageSpec>) -> Result<Plan> {
        let name = spec.name.as_str();
        let mut plan = Plan {
            name: name.to_string(),
            backend: LOCAL_BACKEND.to_string(),
            ..Plan::default()
        };
        let change = |key: &str, old: Option<String>, new: String| Change {
            key: key.to_string(),
            old,
            new,
        };
        let memory = spec.memory.to_string();
        match self.lookup(name)? {
            None => {
                plan.create = true;
                plan.changes
                    .push(change("image", None, image_name(spec).to_string()));
                plan.changes
                    .push(change("cpus", None, spec.cpus.to_string()));
                plan.changes.push(change("memory", None, memory));
                plan.resize = spec.disk.map(|d| d.to_string());
                plan.start = true;
            }
            Some((dom, state)) => {
                let info = dom.info().map_err(lv).context("reading the domain")?;
                let old_memory = Size::from_bytes(info.max_mem * 1024).to_string();
                if info.nr_virt_cpu != spec.cpus {
                    plan.changes.push(change(
                        "cpus",
                        Some(info.nr_virt_cpu.to_string()),
                        spec.cpus.to_string(),
                    ));
                }
                if old_memory != memory {
                    plan.changes
                        .push(change("memory", Some(old_memory), memory));
                }
                if let Some(want) = spec.disk {
                    let have = qemu_img::virtual_size(&self.home.vm_disk(name)).unwrap_or(0);
                    if want.bytes() > have {
                        plan.resize = Some(want.to_string());
                    }
                }
                let drift = self.target(spec, None)?.hash != state.spec_hash;
                if drift && plan.changes.is_empty() {
                    plan.changes.push(change(
                        "spec",
                        Some(state.spec_hash.clone()),
                        "changed".into(),
                    ));
                }
                let running = dom.is_active().map_err(lv).context("asking libvirt")?;
                plan.start = !running;
                plan.restart_needed = running && drift;
            }
        }
        Ok(plan)
    }

    fn env_stale(&self, spec: &VmSpec) -> Result<bool> {
        let path = self.home.vm_env_file(spec.name.as_str());
        let started_with = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(anyhow!(e)
                    .context(format!("reading {}", path.display()))
                    .into());
            }
        };
        Ok(started_with != crate::spec::env_file(&spec.guest_env()))
    }

    fn ssh_endpoint(&self, name: &str) -> Result<Endpoint> {
        let (_, state) = self.require(name)?;
        Ok(Endpoint {
            vm: name.to_string(),
            host: domain::LISTEN_ADDRESS.to_string(),
            port: state.ssh_port,
            user: state.user,
            identity: self.identity.private_key.clone(),
            known_hosts: self.home.vm_known_hosts(name),
            strict: self.home.vm_pinned_host_key(name).is_file(),
        })
    }
}
