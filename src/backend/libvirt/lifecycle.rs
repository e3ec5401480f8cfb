//! The local backend's lifecycle steps: disks, domain definitions, ports,
//! start and stop, status, list and plan.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use virt::domain::Domain;
use virt::sys;

use super::{LocalBackend, Target, image_name, live_state, log_tail, lv, remove_dir};
use crate::backend::{
    BackendError, Change, Existing, Lifecycle, Plan, Prepared, Result, State, Timings, VmStatus,
};
use crate::domain::{self, DomainPlan, VmState};
use crate::failpoint;
use crate::fsutil::FileLock;
use crate::guest::Guest;
use crate::image::{PreparedImage, qemu_img};
use crate::paths;
use crate::ports::{self, SPICE_PORT_BASE, SSH_PORT_BASE};
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

impl LocalBackend {
    /// SSH and SPICE ports for `spec`, keeping `current` ones while they stay
    /// usable; the host ports of its forwards must be free, and are not chosen.
    fn ports_for(&self, spec: &VmSpec, current: Option<&VmState>) -> Result<(u16, u16)> {
        let name = spec.name.as_str();
        let mut claims = self.claims(name)?;
        for forward in &spec.forwards {
            ports::check_forward(name, forward, &claims).map_err(|e| anyhow!("{name}: {e}"))?;
        }
        for forward in &spec.forwards {
            claims.add(forward.host_port, &format!("{name} (forward)"));
        }
        let mut pick = |kind, base, pinned, current| {
            let port = ports::choose(kind, base, name, pinned, current, &claims)
                .map_err(|e| anyhow!("{name}: {e}"))?;
            // Claimed under another label, so the VM's next port cannot reuse it.
            claims.add(port, &format!("{name} ({kind})"));
            Ok::<_, BackendError>(port)
        };
        let ssh = pick(
            "ssh",
            SSH_PORT_BASE,
            spec.ssh_port,
            current.map(|s| s.ssh_port),
        )?;
        let spice = pick(
            "spice",
            SPICE_PORT_BASE,
            spec.spice_port,
            current.map(|s| s.spice_port),
        )?;
        Ok((ssh, spice))
    }

    /// The plan of `spec`'s domain; `previous` is the VM's state when it is
    /// redefined.
    fn domain_plan(
        &self,
        spec: &VmSpec,
        image: &PreparedImage,
        target: &Target,
        ports: (u16, u16),
        image_digest: &str,
        previous: Option<&VmState>,
    ) -> DomainPlan {
        let mut state = VmState::new(
            spec,
            image_digest,
            target.hash.clone(),
            ports,
            target.accel,
            target.network,
        );
        state.agent = target.agent;
        state.host_key = target.host_key.clone();
        state.home = Some(self.home_key.clone());
        let kernel = match image.kernel.clone() {
            // A NixOS image's kernel boots directly only while the VM's disk
            // holds that image's system, unchanged (`Lifecycle::system_changed`).
            Some(kernel) if kernel.disk_boots => {
                let direct = previous.is_none_or(|p| {
                    p.boot.as_deref() == Some(domain::BOOT_DIRECT) && p.image_digest == image.digest
                });
                state.boot = Some(
                    if direct {
                        domain::BOOT_DIRECT
                    } else {
                        domain::BOOT_DISK
                    }
                    .to_string(),
                );
                direct.then_some(kernel)
            }
            other => other,
        };
        let mut plan = DomainPlan::new(
            spec,
            &self.home,
            &self.runtime_dir,
            kernel,
            &self.identity.public_line,
            target.accel,
            target.network,
            state,
        );
        if target.cloud_init {
            plan.seed = Some(self.home.vm_seed(spec.name.as_str()));
        }
        plan
    }

    fn define(&self, plan: &DomainPlan) -> Result<Domain> {
        let xml = plan.to_xml().context("writing domain XML")?;
        Ok(self
            .define_xml(&xml)
            .with_context(|| format!("defining {} in libvirt", plan.domain_name()))?)
    }

    /// Makes the VM's folder and disk. The disk is a thin overlay on the base
    /// image (or blank); its size is checked before anything is written.
    fn create_disk(&self, spec: &VmSpec, image: &PreparedImage) -> anyhow::Result<()> {
        let name = spec.name.as_str();
        let size = match (&image.base, spec.disk) {
            (Some(base), Some(disk)) if disk.bytes() < base.virtual_size => bail!(
                "vms.{name}.disk = {disk} is smaller than image {}'s virtual size {}",
                image_name(spec),
                Size::from_bytes(base.virtual_size)
            ),
            (_, disk) => disk,
        };
        let dir = self.home.vm_dir(name);
        if dir.exists() {
            tracing::warn!(
                "removing leftover folder {} of a VM that has no domain",
                dir.display()
            );
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        crate::fsutil::create_private_dir(&dir)?;
        let disk = self.home.vm_disk(name);
        match &image.base {
            Some(base) => {
                qemu_img::create_overlay(&base.file.path, base.format, &disk, size.map(Size::bytes))
            }
            None => qemu_img::create_blank(&disk, size.unwrap_or(DEFAULT_BLANK_DISK).bytes()),
        }
    }

    /// Grows a stopped VM's disk to its spec's size; shrinking is refused.
    fn resize_disk(&self, spec: &VmSpec, disk: &std::path::Path) -> anyhow::Result<()> {
        let Some(want) = spec.disk else { return Ok(()) };
        let have = qemu_img::virtual_size(disk)?;
        if want.bytes() < have {
            bail!(
                "vms.{}.disk = {want} is smaller than the VM's disk ({}); disks only grow",
                spec.name,
                Size::from_bytes(have)
            );
        }
        if want.bytes() > have {
            qemu_img::grow(disk, want.bytes())?;
        }
        Ok(())
    }

    /// Makes the disk and defines the domain, with ports chosen under the
    /// per-user lock; on error nothing of the VM is left.
    fn create_domain(
        &self,
        spec: &VmSpec,
        image: &PreparedImage,
        target: &Target,
        timings: &mut Timings,
        progress: &dyn Reporter,
    ) -> Result<()> {
        let name = spec.name.as_str();
        // Held from choosing ports until the domain (which claims them) is defined.
        let ports_guard = FileLock::acquire(&paths::lock_file()?)?;
        let ports = self.ports_for(spec, None)?;
        let plan = self.domain_plan(spec, image, target, ports, &image.digest, None);
        let rollback = || {
            if let Err(e) = std::fs::remove_dir_all(self.home.vm_dir(name))
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("{name}: removing the half-made VM's folder: {e}");
            }
        };
        if let Err(e) = self
            .create_disk(spec, image)
            .and_then(|()| self.write_guest_files(spec, target))
        {
            rollback();
            return Err(e.into());
        }
        failpoint::hit("up:disk-created");
        timings.mark("overlay");
        progress.step(name, "disk created");
        let xml = match plan.to_xml() {
            Ok(xml) => xml,
            Err(e) => {
                rollback();
                return Err(anyhow!(e).context("writing domain XML").into());
            }
        };
        timings.mark("xml");
        if let Err(e) = self.define_xml(&xml) {
            // A define whose answer was lost with the connection may have happened.
            if !matches!(self.lookup(name), Ok(Some(_))) {
                rollback();
            }
            return Err(e.context(format!("defining {}", plan.domain_name())).into());
        }
        drop(ports_guard);
        failpoint::hit("up:defined");
        timings.mark("define");
        progress.step(name, "defined");
        Ok(())
    }

    /// Writes what the guest reads at its next start: the env QEMU hands over
    /// through fw_cfg (0600, atomically; removed when the VM has none) and,
    /// for a `cloud_init` image, the NoCloud seed disk.
    fn write_guest_files(&self, spec: &VmSpec, target: &Target) -> anyhow::Result<()> {
        let name = spec.name.as_str();
        let path = self.home.vm_env_file(name);
        if !spec.has_guest_env() {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", path.display()));
                }
                _ => {}
            }
        } else {
            let env = crate::spec::env_file(&spec.guest_env());
            crate::fsutil::write_atomic(&path, env.as_bytes(), 0o600)?;
        }
        if target.cloud_init {
            let guest_env = spec.guest_env();
            let mut keys = vec![self.identity.public_line.clone()];
            keys.extend(spec.ssh_keys.iter().cloned());
            let seed = crate::nocloud::Seed {
                hostname: name,
                user: &spec.user,
                authorized_keys: &keys,
                env: &guest_env,
                grow_root: true,
                network_config: None,
            };
            let path = self.home.vm_seed(name);
            crate::nocloud::write_seed(&seed, &path)
                .with_context(|| format!("writing the cloud-init seed {}", path.display()))?;
        }
        Ok(())
    }

    fn start_domain(&self, dom: &Domain, name: &str) -> Result<()> {
        dom.create().map_err(|e| {
            anyhow!(
                "starting {name}: {}{}",
                lv(e),
                log_tail(&self.home.vm_serial_log(name))
            )
        })?;
        Ok(())
    }
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
            spec_hash: state.spec_hash,
            readonly: state.readonly,
            ssh_port: Some(state.ssh_port),
            spice_port: Some(state.spice_port),
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
        .map_err(|e| anyhow!("{name}: {e}{}", log_tail(&self.home.vm_serial_log(name))))?;
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
