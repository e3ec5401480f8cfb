//! The local backend: VMs in libvirt (session mode by default), with the domain's
//! `<metadata>` as the only state store.

mod guest_ops;
mod host;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::sys;

use super::{
    Backend, BackendError, DownPath, ExecOutcome, HostKey, Phase, Result, SnapshotAction,
    SnapshotInfo, State, Stream, UpAction, UpOutcome, VmStatus,
};
use crate::domain::{self, DomainPlan, VmState, domain_name, spec_hash};
use crate::failpoint;
use crate::fsutil::FileLock;
use crate::image::{ImageStore, PreparedImage, qemu_img};
use crate::paths::{self, Home};
use crate::ports::{self, Claims, SPICE_PORT_BASE, SSH_PORT_BASE};
use crate::progress::Reporter;
use crate::spec::{DEFAULT_HOST_KEY, GIB, ImageSpec, LOCAL_BACKEND, MAX_NAME_LEN, Size, VmSpec};
use crate::ssh::{self, Endpoint, Identity};

pub use host::{KVM_DEVICE, domcaps_offer_passt, libvirt_offers_kvm};

/// The libvirt URI used unless `--connect` or `AGENTVM_LIBVIRT_URI` says otherwise.
pub const DEFAULT_URI: &str = "qemu:///session";
/// Size of the blank disk a kernel-boot VM without a `file` and a `disk` gets.
pub const DEFAULT_BLANK_DISK: Size = Size::from_bytes(8 * GIB);
/// How often `down` checks whether the guest has stopped.
const POLL: Duration = Duration::from_millis(200);
/// Lines of the serial log shown when a guest fails to come up.
const LOG_TAIL_LINES: usize = 15;

pub struct LocalBackend {
    conn: Connect,
    home: Home,
    runtime_dir: PathBuf,
    store: ImageStore,
    identity: Identity,
}

impl LocalBackend {
    pub fn connect(uri: &str, home: Home) -> anyhow::Result<Self> {
        home.ensure()?;
        // libvirt prints every error to stderr by default; agentvm reports its own.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(lv)
            .with_context(|| {
            format!("connecting to libvirt at {uri} (is libvirt installed, and for qemu:///system are you in the libvirt group?)")
        })?;
        let identity = Identity::ensure(&home)?;
        let runtime_dir = paths::runtime_dir()?;
        let longest = domain::guest_agent_socket(&runtime_dir, &"x".repeat(MAX_NAME_LEN));
        if longest.as_os_str().len() > domain::MAX_SOCKET_PATH {
            bail!(
                "the runtime folder {} is too long a path for UNIX sockets; set XDG_RUNTIME_DIR to a shorter folder",
                runtime_dir.display()
            );
        }
        Ok(Self {
            conn,
            runtime_dir,
            store: ImageStore::new(&home),
            home,
            identity,
        })
    }

    pub fn home(&self) -> &Home {
        &self.home
    }

    pub fn store(&self) -> &ImageStore {
        &self.store
    }

    /// The agentvm domain of `name` with its state, if one is defined.
    fn lookup(&self, name: &str) -> Result<Option<(Domain, VmState)>> {
        let dom_name = domain_name(name);
        let dom = match self.conn.lookup_domain_by_name(&dom_name) {
            Ok(dom) => dom,
            Err(e) if e.code() == Enum::Known(ErrorNumber::NoDomain) => return Ok(None),
            Err(e) => {
                return Err(lv(e).context(format!("looking up {dom_name}")).into());
            }
        };
        let state = read_state(&dom).ok_or_else(|| {
            anyhow!("libvirt domain {dom_name} exists but was not made by agentvm (no agentvm metadata); refusing to touch it")
        })?;
        Ok(Some((dom, state)))
    }

    fn require_running(&self, name: &str) -> Result<(Domain, VmState)> {
        let (dom, state) = self.require(name)?;
        if !dom.is_active().map_err(lv).context("asking libvirt")? {
            return Err(anyhow!("{name} is not running (agentvm up {name})").into());
        }
        Ok((dom, state))
    }

    fn require(&self, name: &str) -> Result<(Domain, VmState)> {
        self.lookup(name)?
            .ok_or_else(|| BackendError::NotFound(name.to_string()))
    }

    /// Every agentvm VM's lifecycle state, without asking guests anything
    /// (cheap enough to poll, unlike `list`, which talks to each guest agent).
    pub fn states(&self) -> Result<Vec<(String, State)>> {
        self.managed_domains()?
            .iter()
            .map(|(dom, state)| Ok((state.name.clone(), live_state(dom)?)))
            .collect()
    }

    /// Ports held by every agentvm VM.
    pub fn port_claims(&self) -> Result<Claims> {
        self.claims("")
    }

    /// Ports held by every agentvm VM except `except`.
    fn claims(&self, except: &str) -> Result<Claims> {
        let mut claims = Claims::default();
        for (_, state) in self.managed_domains()? {
            if state.name != except {
                claims.add(state.ssh_port, &state.name);
                claims.add(state.spice_port, &state.name);
            }
        }
        Ok(claims)
    }

    /// Repairs what a process killed mid-operation can leave behind: VM folders
    /// with no domain (an interrupted `up` or `destroy`) and temp files of
    /// interrupted imports and atomic writes. Returns a line per repair.
    pub fn reconcile(&self) -> Result<Vec<String>> {
        let defined: std::collections::HashSet<String> = self
            .managed_domains()?
            .into_iter()
            .map(|(_, state)| state.name)
            .collect();
        let mut repaired = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.home.vms_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.path().is_dir() && !defined.contains(&name) {
                    remove_dir(&entry.path())?;
                    repaired.push(format!(
                        "removed {}: VM {name} has no domain (interrupted up or destroy)",
                        entry.path().display()
                    ));
                }
            }
        }
        for dir in [
            self.home.images_dir(),
            self.home.ssh_dir(),
            self.home.root().to_path_buf(),
        ] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                if crate::fsutil::TEMP_PREFIXES
                    .iter()
                    .any(|p| file.starts_with(p))
                {
                    std::fs::remove_file(entry.path())
                        .with_context(|| format!("removing {}", entry.path().display()))?;
                    repaired.push(format!(
                        "removed {} (left by an interrupted write)",
                        entry.path().display()
                    ));
                }
            }
        }
        Ok(repaired)
    }

    fn managed_domains(&self) -> Result<Vec<(Domain, VmState)>> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(lv)
            .context("listing libvirt domains")?;
        Ok(domains
            .into_iter()
            .filter(|d| d.name().is_ok_and(|n| n.starts_with(domain::DOMAIN_PREFIX)))
            .filter_map(|d| read_state(&d).map(|s| (d, s)))
            .collect())
    }

    /// SSH and SPICE ports for `spec`, keeping `current` ones while they stay usable.
    fn ports_for(&self, spec: &VmSpec, current: Option<&VmState>) -> Result<(u16, u16)> {
        let name = spec.name.as_str();
        let mut claims = self.claims(name)?;
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

    fn plan(
        &self,
        spec: &VmSpec,
        image: &PreparedImage,
        target: &Target,
        ports: (u16, u16),
        image_digest: &str,
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
        DomainPlan::new(
            spec,
            &self.home,
            &self.runtime_dir,
            image.kernel.clone(),
            &self.identity.public_line,
            target.accel,
            target.network,
            state,
        )
    }

    /// How `spec` (on `image`, when known) is applied on this host now.
    fn target(&self, spec: &VmSpec, image: Option<&ImageSpec>) -> Result<Target> {
        let accel = host::accel(&self.conn, spec.accel)?;
        let network = host::network(&self.conn, accel)?;
        Ok(Target {
            accel,
            network,
            hash: spec_hash(spec, accel, network),
            agent: image.is_none_or(|i| i.agent),
            host_key: image.map_or_else(|| DEFAULT_HOST_KEY.to_string(), |i| i.host_key.clone()),
        })
    }

    fn define(&self, plan: &DomainPlan) -> Result<Domain> {
        let xml = plan.to_xml().context("writing domain XML")?;
        Ok(self
            .conn
            .define_domain_xml(&xml)
            .map_err(lv)
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
    fn resize_disk(&self, spec: &VmSpec) -> anyhow::Result<()> {
        let Some(want) = spec.disk else { return Ok(()) };
        let disk = self.home.vm_disk(spec.name.as_str());
        let have = qemu_img::virtual_size(&disk)?;
        if want.bytes() < have {
            bail!(
                "vms.{}.disk = {want} is smaller than the VM's disk ({}); disks only grow",
                spec.name,
                Size::from_bytes(have)
            );
        }
        if want.bytes() > have {
            qemu_img::grow(&disk, want.bytes())?;
        }
        Ok(())
    }

    fn create(
        &self,
        spec: &VmSpec,
        image: &PreparedImage,
        target: &Target,
        timings: &mut Timings,
        progress: &dyn Reporter,
    ) -> Result<UpAction> {
        let name = spec.name.as_str();
        // Held from choosing ports until the domain (which claims them) is defined.
        let ports_guard = FileLock::acquire(&paths::lock_file()?)?;
        let ports = self.ports_for(spec, None)?;
        let plan = self.plan(spec, image, target, ports, &image.digest);
        let rollback = |dom: Option<&Domain>| {
            if let Some(dom) = dom {
                let _ = dom.undefine();
            }
            let _ = std::fs::remove_dir_all(self.home.vm_dir(name));
        };
        if let Err(e) = self.create_disk(spec, image) {
            rollback(None);
            return Err(e.into());
        }
        failpoint::hit("up:disk-created");
        timings.mark("overlay");
        progress.step(name, "disk created");
        let xml = match plan.to_xml() {
            Ok(xml) => xml,
            Err(e) => {
                rollback(None);
                return Err(anyhow!(e).context("writing domain XML").into());
            }
        };
        timings.mark("xml");
        let dom = match self.conn.define_domain_xml(&xml) {
            Ok(dom) => dom,
            Err(e) => {
                rollback(None);
                return Err(lv(e)
                    .context(format!("defining {}", plan.domain_name()))
                    .into());
            }
        };
        drop(ports_guard);
        failpoint::hit("up:defined");
        timings.mark("define");
        progress.step(name, "defined");
        if let Err(e) = self.start(&dom, name) {
            rollback(Some(&dom));
            return Err(e);
        }
        failpoint::hit("up:started");
        timings.mark("start");
        Ok(UpAction::Created)
    }

    fn start(&self, dom: &Domain, name: &str) -> Result<()> {
        dom.create().map_err(|e| {
            anyhow!(
                "starting {name}: {}{}",
                e.message(),
                log_tail(&self.home.vm_serial_log(name))
            )
        })?;
        Ok(())
    }

    fn status_of(&self, dom: &Domain, state: &VmState, spec: Option<&VmSpec>) -> Result<VmStatus> {
        let live = live_state(dom)?;
        let (agent, ips) = self.agent_info(dom, state);
        let restart_needed = match spec {
            Some(spec) if live == State::Running => {
                self.target(spec, None)?.hash != state.spec_hash
            }
            _ => false,
        };
        Ok(VmStatus {
            name: state.name.clone(),
            state: live,
            backend: LOCAL_BACKEND.to_string(),
            ssh_port: Some(state.ssh_port),
            spice_port: Some(state.spice_port),
            image: Some(state.image.clone()),
            readonly: spec.map_or(state.readonly, |s| s.readonly),
            restart_needed,
            in_spec: spec.is_some(),
            purpose: spec.map_or(state.purpose.clone(), |s| s.purpose.clone()),
            ips,
            agent,
        })
    }
}

impl Backend for LocalBackend {
    fn name(&self) -> &str {
        LOCAL_BACKEND
    }

    fn kind(&self) -> &'static str {
        "libvirt"
    }

    fn up(
        &self,
        spec: &VmSpec,
        image: Option<&ImageSpec>,
        progress: &dyn Reporter,
    ) -> Result<UpOutcome> {
        let name = spec.name.as_str();
        let image =
            image.ok_or_else(|| anyhow!("{name}: a VM on the local backend needs an image"))?;
        let mut timings = Timings::start();
        let prepared = self.store.prepare(image, progress)?;
        failpoint::hit("up:image-imported");
        timings.mark("image");
        let target = self.target(spec, Some(image))?;

        let (action, restart_needed) = match self.lookup(name)? {
            None => {
                progress.step(
                    name,
                    &format!(
                        "creating ({} with {})",
                        target.accel.as_str(),
                        target.network.as_str()
                    ),
                );
                let action = self.create(spec, &prepared, &target, &mut timings, progress)?;
                (action, false)
            }
            Some((dom, state)) => {
                if state.image_digest != prepared.digest {
                    progress.step(
                        name,
                        &format!(
                            "image {} changed since this VM was made; the VM keeps its old base (destroy and up to use the new one)",
                            image_name(spec)
                        ),
                    );
                }
                if dom.is_active().map_err(lv).context("asking libvirt")? {
                    let drift = state.spec_hash != target.hash;
                    if drift {
                        progress.step(name, "running, but its spec changed: restart needed");
                    }
                    (UpAction::AlreadyRunning, drift)
                } else {
                    let spec_changed = state.spec_hash != target.hash;
                    if spec_changed && spec.readonly {
                        return Err(BackendError::ReadOnly {
                            name: name.to_string(),
                            action: "redefine",
                        });
                    }
                    let ports_guard = FileLock::acquire(&paths::lock_file()?)?;
                    let (ssh_port, spice_port) = self.ports_for(spec, Some(&state))?;
                    let moved = (ssh_port, spice_port) != (state.ssh_port, state.spice_port);
                    let action = if spec_changed || moved {
                        if moved {
                            progress.step(
                                name,
                                &format!("ports now ssh {ssh_port}, spice {spice_port} (the old ones are taken)"),
                            );
                        }
                        self.resize_disk(spec)?;
                        let mut plan = self.plan(
                            spec,
                            &prepared,
                            &target,
                            (ssh_port, spice_port),
                            &state.image_digest,
                        );
                        plan.uuid = Some(
                            dom.uuid_string()
                                .map_err(lv)
                                .context("reading the domain UUID")?,
                        );
                        timings.mark("overlay");
                        self.define(&plan)?;
                        drop(ports_guard);
                        timings.mark("define");
                        progress.step(name, "redefined from its changed spec");
                        UpAction::Redefined
                    } else {
                        UpAction::Started
                    };
                    let dom = self.require(name)?.0;
                    self.start(&dom, name)?;
                    timings.mark("start");
                    (action, false)
                }
            }
        };
        let (_, state) = self.require(name)?;
        progress.step(
            name,
            &format!("{} (ssh port {})", action_text(action), state.ssh_port),
        );
        Ok(UpOutcome {
            name: name.to_string(),
            action,
            restart_needed,
            ssh_port: state.ssh_port,
            spice_port: Some(state.spice_port),
            timings: timings.phases,
        })
    }

    fn wait_ready(&self, name: &str, timeout: Duration) -> Result<Duration> {
        let (dom, state) = self.require(name)?;
        let start = Instant::now();
        ssh::wait_for_banner(state.ssh_port, timeout, || {
            dom.is_active().map_err(lv).context("asking libvirt")
        })
        .map_err(|e| anyhow!("{name}: {e}{}", log_tail(&self.home.vm_serial_log(name))))?;
        if state.agent {
            self.wait_for_agent(&dom, name, start + timeout)?;
        }
        Ok(start.elapsed())
    }

    fn down(&self, name: &str, force: bool, timeout: Duration) -> Result<DownPath> {
        let (dom, state) = self.require(name)?;
        if !dom.is_active().map_err(lv).context("asking libvirt")? {
            return Ok(DownPath::AlreadyStopped);
        }
        if force {
            dom.destroy()
                .map_err(lv)
                .with_context(|| format!("forcing {name} off"))?;
            return Ok(DownPath::Forced);
        }
        self.stop_gracefully(&dom, &state, timeout)
    }

    fn plan(&self, spec: &VmSpec, _image: Option<&ImageSpec>) -> Result<super::Plan> {
        let name = spec.name.as_str();
        let mut plan = super::Plan {
            name: name.to_string(),
            backend: LOCAL_BACKEND.to_string(),
            ..super::Plan::default()
        };
        let change = |key: &str, old: Option<String>, new: String| super::Change {
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

    fn exec(
        &self,
        name: &str,
        argv: &[String],
        timeout: Duration,
        output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        let (dom, state) = self.require_running(name)?;
        self.exec_in(&dom, &state, argv, timeout, output)
    }

    fn host_key(&self, name: &str) -> Result<HostKey> {
        let (dom, state) = self.require_running(name)?;
        self.pin_host_key(&dom, &state)
    }

    fn screenshot(&self, name: &str, png: &Path) -> Result<(u32, u32)> {
        let (dom, _) = self.require_running(name)?;
        self.screendump(&dom, name, png)
    }

    fn snapshot(&self, name: &str, action: &SnapshotAction) -> Result<Vec<SnapshotInfo>> {
        let (dom, _) = self.require(name)?;
        self.snapshots(&dom, name, action)
    }

    fn destroy(&self, name: &str) -> Result<()> {
        let dir = self.home.vm_dir(name);
        match self.lookup(name)? {
            Some((dom, _)) => {
                if dom.is_active().map_err(lv).context("asking libvirt")? {
                    dom.destroy()
                        .map_err(lv)
                        .with_context(|| format!("stopping {name}"))?;
                }
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
            None => Ok(VmStatus {
                name: name.to_string(),
                state: State::Absent,
                backend: LOCAL_BACKEND.to_string(),
                ssh_port: None,
                spice_port: None,
                image: spec.and_then(|s| s.image.as_ref()).map(ToString::to_string),
                readonly: spec.is_some_and(|s| s.readonly),
                restart_needed: false,
                in_spec: spec.is_some(),
                purpose: spec.and_then(|s| s.purpose.clone()),
                ips: Vec::new(),
                agent: guest_ops::AGENT_STOPPED.to_string(),
            }),
        }
    }

    fn list(&self) -> Result<Vec<VmStatus>> {
        self.managed_domains()?
            .iter()
            .map(|(dom, state)| self.status_of(dom, state, None))
            .collect()
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

    fn serial_log(&self, name: &str) -> Result<PathBuf> {
        self.require(name)?;
        Ok(self.home.vm_serial_log(name))
    }

    fn spice_uri(&self, name: &str) -> Result<String> {
        let (_, state) = self.require(name)?;
        Ok(format!(
            "spice://{}:{}",
            domain::LISTEN_ADDRESS,
            state.spice_port
        ))
    }
}

fn image_name(spec: &VmSpec) -> &str {
    spec.image.as_ref().map_or("-", |n| n.as_str())
}

fn read_state(dom: &Domain) -> Option<VmState> {
    let xml = dom
        .metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(domain::AGENTVM_NS),
            0,
        )
        .ok()?;
    quick_xml::de::from_str(&xml)
        .map_err(|e| tracing::warn!("unreadable agentvm metadata on {:?}: {e}", dom.name()))
        .ok()
}

fn live_state(dom: &Domain) -> Result<State> {
    let (state, reason) = dom.state().map_err(lv).context("reading domain state")?;
    Ok(match state {
        Enum::Known(DomainState::Running | DomainState::Blocked | DomainState::Paused)
        | Enum::Known(DomainState::Shutdown | DomainState::PMSuspended) => State::Running,
        Enum::Known(DomainState::Crashed) => State::Crashed,
        Enum::Known(DomainState::Shutoff)
            if matches!(
                reason,
                Enum::Known(virt::domain::DomainStateReason::Shutoff(Enum::Known(
                    virt::domain::DomainShutoffReason::Crashed
                        | virt::domain::DomainShutoffReason::Failed
                )))
            ) =>
        {
            State::Crashed
        }
        _ => State::Stopped,
    })
}

fn action_text(action: UpAction) -> &'static str {
    match action {
        UpAction::Created => "created and started",
        UpAction::Redefined => "redefined and started",
        UpAction::Started => "started",
        UpAction::AlreadyRunning => "already running",
    }
}

/// A libvirt error as agentvm shows it: libvirt's message, without its numeric codes.
pub(crate) fn lv(e: virt::error::Error) -> anyhow::Error {
    anyhow!("{}", e.message())
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The end of the serial log, to show with an error about a guest.
fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    if tail.is_empty() {
        return String::new();
    }
    format!(
        "\nlast lines of {}:\n  {}",
        path.display(),
        tail.join("\n  ")
    )
}

/// How a spec is applied on this host, and the hash that records it.
struct Target {
    accel: domain::Accel,
    network: domain::NetworkMode,
    hash: String,
    agent: bool,
    host_key: String,
}

/// Wall time of each phase of an operation.
struct Timings {
    last: Instant,
    phases: Vec<Phase>,
}

impl Timings {
    fn start() -> Self {
        Self {
            last: Instant::now(),
            phases: Vec::new(),
        }
    }

    fn mark(&mut self, phase: &str) {
        let now = Instant::now();
        self.phases.push(Phase {
            phase: phase.to_string(),
            ms: (now - self.last).as_secs_f64() * 1000.0,
        });
        self.last = now;
    }
}
