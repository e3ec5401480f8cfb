//! The local backend's steps that make a VM: its ports, its domain plan
//! (with how it boots), its disk and guest files, and defining and starting
//! its domain. `lifecycle.rs` sequences them as the `Lifecycle` role.

use anyhow::{Context, anyhow, bail};
use virt::domain::Domain;

use super::lifecycle::DEFAULT_BLANK_DISK;
use super::{LocalBackend, Target, image_name, log_tail, lv};
use crate::backend::{BackendError, Result, Timings};
use crate::domain::{self, DomainPlan, VmState};
use crate::failpoint;
use crate::fsutil::FileLock;
use crate::image::{PreparedImage, qemu_img};
use crate::paths;
use crate::ports::{self, SPICE_PORT_BASE, SSH_PORT_BASE};
use crate::progress::Reporter;
use crate::spec::{Size, VmSpec};

impl LocalBackend {
    /// SSH and SPICE ports for `spec`, keeping `current` ones while they stay
    /// usable; the host ports of its forwards must be free, and are not chosen.
    pub(super) fn ports_for(&self, spec: &VmSpec, current: Option<&VmState>) -> Result<(u16, u16)> {
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
    pub(super) fn domain_plan(
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

    pub(super) fn define(&self, plan: &DomainPlan) -> Result<Domain> {
        let xml = plan.to_xml().context("writing domain XML")?;
        Ok(self
            .define_xml(&xml)
            .with_context(|| format!("defining {} in libvirt", plan.domain_name()))?)
    }

    /// Makes the VM's folder and disk. The disk is a thin overlay on the base
    /// image (or blank); its size is checked before anything is written.
    pub(super) fn create_disk(&self, spec: &VmSpec, image: &PreparedImage) -> anyhow::Result<()> {
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
    pub(super) fn resize_disk(&self, spec: &VmSpec, disk: &std::path::Path) -> anyhow::Result<()> {
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
    pub(super) fn create_domain(
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
    pub(super) fn write_guest_files(&self, spec: &VmSpec, target: &Target) -> anyhow::Result<()> {
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

    pub(super) fn start_domain(&self, dom: &Domain, name: &str) -> Result<()> {
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
