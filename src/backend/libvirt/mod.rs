//! The local backend: VMs in libvirt (session mode by default), with the domain's
//! `<metadata>` as the only state store.

mod agent;
mod conn;
mod define;
mod display;
mod events;
mod fork;
mod fork_memory;
mod fork_snapshot;
mod fork_xml;
mod forwards;
mod heal;
mod host;
mod lifecycle;
mod owner;
mod repair;
mod saveimage;
mod shares;
mod snapshots;

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::error::ErrorNumber;
use virt::sys;

use super::{BackendError, Result, State, VmStatus};
use crate::domain::{self, VmState, domain_name, spec_hash};
use crate::image::ImageStore;
use crate::paths::{self, Home};
use crate::ports::Claims;
use crate::spec::{DEFAULT_HOST_KEY, GIB, ImageSpec, LOCAL_BACKEND, MAX_NAME_LEN, Size, VmSpec};
use crate::ssh::Identity;

pub use heal::Healing;
pub use host::{
    KVM_DEVICE, domcaps_offer_passt, kvm_device_unusable, kvm_unusable, libvirt_offers_kvm,
};

/// The libvirt URI used unless `--connect` or `AGENTVM_LIBVIRT_URI` says otherwise.
pub const DEFAULT_URI: &str = "qemu:///session";
/// Size of the blank disk a kernel-boot VM without a `file` and a `disk` gets.
pub const DEFAULT_BLANK_DISK: Size = Size::from_bytes(8 * GIB);
/// Lines of the serial log shown when a guest fails to come up.
const LOG_TAIL_LINES: usize = 15;

pub struct LocalBackend {
    libvirt: conn::Conn,
    home: Home,
    /// The canonical path of `home`, recorded in the metadata of the VMs it makes.
    home_key: String,
    runtime_dir: PathBuf,
    store: ImageStore,
    identity: Identity,
}

impl LocalBackend {
    pub fn connect(uri: &str, home: Home) -> anyhow::Result<Self> {
        home.ensure()?;
        // libvirt prints every error to stderr by default; agentvm reports its own.
        virt::error::clear_error_callback();
        let libvirt = conn::Conn::open(uri)?;
        let home_key = paths::canonical_home(&home)?.display().to_string();
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
            libvirt,
            home_key,
            runtime_dir,
            store: ImageStore::new(&home),
            home,
            identity,
        })
    }

    pub fn store(&self) -> &ImageStore {
        &self.store
    }

    /// The libvirt connection to use now (a new one when libvirtd restarted).
    fn conn(&self) -> anyhow::Result<Connect> {
        self.libvirt.get()
    }

    /// Defines (or redefines) a domain from its XML.
    fn define_xml(&self, xml: &str) -> anyhow::Result<Domain> {
        self.conn()?.define_domain_xml(xml).map_err(lv)
    }

    /// The agentvm domain of `name` with its state, if this home has one. A
    /// domain of that name made by another agentvm home is an error naming it.
    fn lookup(&self, name: &str) -> Result<Option<(Domain, VmState)>> {
        let dom_name = domain_name(name);
        let (conn, generation) = self.libvirt.get_at()?;
        let dom = match conn.lookup_domain_by_name(&dom_name) {
            Ok(dom) => dom,
            Err(e) if e.code() == Enum::Known(ErrorNumber::NoDomain) => return Ok(None),
            Err(e) => {
                return Err(lv(e).context(format!("looking up {dom_name}")).into());
            }
        };
        let Some(state) = read_state(&dom) else {
            if !self.libvirt.died_since(generation) {
                return Err(anyhow!("libvirt domain {dom_name} exists but was not made by agentvm (no agentvm metadata); refusing to touch it").into());
            }
            return Err(anyhow!("{}", conn::LOST).into());
        };
        if let owner::Owner::Other(home) = self.owner(&dom, &state) {
            return Err(anyhow!(
                "VM {name} already exists in agentvm home {home}; libvirt's session has one namespace of VM names per user — pick another name"
            )
            .into());
        }
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

    /// Ports held by every agentvm VM except `except`, whichever home made it
    /// (ports, like libvirt's session, are per user).
    fn claims(&self, except: &str) -> Result<Claims> {
        let mut claims = Claims::default();
        for (_, state) in self.all_domains()? {
            if state.name != except {
                claims.add(state.ssh_port, &state.name);
                claims.add(state.spice_port, &state.name);
                for forward in &state.forwards {
                    claims.add(forward.host_port, &state.name);
                }
            }
        }
        Ok(claims)
    }

    /// This home's agentvm domains.
    fn managed_domains(&self) -> Result<Vec<(Domain, VmState)>> {
        Ok(self
            .all_domains()?
            .into_iter()
            .filter(|(dom, state)| self.owner(dom, state) == owner::Owner::Us)
            .collect())
    }

    /// Every agentvm domain of this user's libvirt, whichever home made it.
    fn all_domains(&self) -> Result<Vec<(Domain, VmState)>> {
        let (conn, generation) = self.libvirt.get_at()?;
        let domains = conn
            .list_all_domains(0)
            .map_err(lv)
            .context("listing libvirt domains")?;
        let ours: Vec<Domain> = domains
            .into_iter()
            .filter(|d| d.name().is_ok_and(|n| n.starts_with(domain::DOMAIN_PREFIX)))
            .collect();
        let managed = par_map(ours, PARALLEL_QUESTIONS, |d| read_state(&d).map(|s| (d, s)))
            .into_iter()
            .flatten()
            .collect();
        // A domain whose metadata could not be read is left out above; when
        // that was the connection dying, the list is not the whole truth.
        if self.libvirt.died_since(generation) {
            return Err(anyhow!("{}", conn::LOST).into());
        }
        Ok(managed)
    }

    /// How `spec` (on `image`, when known) is applied on this host now.
    fn target(&self, spec: &VmSpec, image: Option<&ImageSpec>) -> Result<Target> {
        let conn = self.conn()?;
        let accel = host::accel(&conn, spec.accel)?;
        // passt has no way to refuse the guest's own connections: egress
        // other than open always runs on SLIRP with restrict=on.
        let network = if spec.egress.is_open() {
            host::network(&conn, accel)?
        } else {
            domain::NetworkMode::Slirp
        };
        Ok(Target {
            accel,
            network,
            hash: spec_hash(spec, accel, network),
            agent: image.is_none_or(|i| i.agent),
            host_key: image.map_or_else(|| DEFAULT_HOST_KEY.to_string(), |i| i.host_key.clone()),
            cloud_init: image.is_some_and(|i| i.cloud_init),
        })
    }

    pub(super) fn status_of(
        &self,
        dom: &Domain,
        state: &VmState,
        spec: Option<&VmSpec>,
    ) -> Result<VmStatus> {
        let live = live_state(dom)?;
        let (agent, ips) = self.agent_info(dom, state, live == State::Running);
        // Local guests get their env through fw_cfg at start.
        let env = self.env_names(&state.name);
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
            env_delivery: (live == State::Running && !env.is_empty())
                .then_some(crate::backend::EnvDelivery::Delivered),
            env,
            node: None,
            // A stopped VM's live forwards went with its QEMU.
            forwards: state
                .forwards
                .iter()
                .filter(|f| live == State::Running || !f.live)
                .map(|f| crate::backend::ForwardStatus::new(&f.forward(), f.live))
                .collect(),
            shares: self.share_status(state, live),
            egress: state.egress(),
            egress_tunnel: None,
        })
    }
}

impl LocalBackend {
    /// The variable names in the env file the VM's last start read.
    fn env_names(&self, name: &str) -> Vec<String> {
        let path = self.home.vm_env_file(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter_map(|line| line.split_once('=').map(|(k, _)| k.to_string()))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!("reading {}: {e}", path.display());
                Vec::new()
            }
        }
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

/// How many threads ask libvirt about many domains at once (each question is
/// a round trip; libvirtd answers several side by side).
pub(super) const PARALLEL_QUESTIONS: usize = 4;

/// `f` over `items` on up to `width` threads, results in order.
pub(super) fn par_map<T: Send, R: Send>(
    items: Vec<T>,
    width: usize,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    if items.len() < 2 || width < 2 {
        return items.into_iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(width);
    let mut chunks: Vec<Vec<T>> = Vec::new();
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        chunks.push(items.by_ref().take(chunk).collect());
    }
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| scope.spawn(move || chunk.into_iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
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

/// A libvirt error as agentvm shows it: libvirt's message, without its numeric
/// codes; the transport failing (libvirtd went away) is said in agentvm's words.
pub(crate) fn lv(e: virt::error::Error) -> anyhow::Error {
    if conn::is_transport_error(&e) {
        tracing::debug!("libvirt transport error: {}", e.message());
        return anyhow!("{}", conn::LOST);
    }
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
    /// The image wants a NoCloud seed disk.
    cloud_init: bool,
}
