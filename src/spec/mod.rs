//! The fleet file `agentvm.toml`: finding it, parsing it, and resolving each VM
//! against `[defaults]` into a complete, validated [`VmSpec`].

mod egress;
mod error;
mod forward;
mod name;
mod raw;
mod resolve;
mod resolve_backend;
mod resolve_egress;
mod resolve_share;
mod share;
mod size;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use egress::{Egress, EgressRule, GUEST_PROXY_PORT, HostPattern, SLIRP_HOST_ADDR};
pub use error::SpecError;
pub use forward::{Forward, MIN_HOST_PORT};
pub use name::{MAX_NAME_LEN, Name, NameError};
pub use raw::Accel;
pub use resolve::is_env_key;
pub use share::{DEFAULT_SHARE_UID, Share, ShareKind};
pub use size::{GIB, KIB, MIB, Size, SizeError};

use crate::paths::{ENV_FILE, FLEET_FILE, non_empty_env};
use raw::{KeySpans, RawFleet};
use resolve::{Locator, Resolver};

pub const DEFAULT_CPUS: u32 = 2;
pub const DEFAULT_MEMORY: Size = Size::from_bytes(2 * GIB);
pub const DEFAULT_USER: &str = "root";
/// The guest file `agentvm hostkey` reads unless the image names another.
pub const DEFAULT_HOST_KEY: &str = "/etc/ssh/ssh_host_ed25519_key.pub";
/// The backend every VM uses unless it names another.
pub const LOCAL_BACKEND: &str = "local";

/// A parsed and validated fleet file.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub file: PathBuf,
    pub images: BTreeMap<Name, ImageSpec>,
    pub vms: BTreeMap<Name, VmSpec>,
    pub backends: BTreeMap<Name, BackendSpec>,
}

/// A `[backends.NAME]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    pub name: Name,
    pub proxmox: ProxmoxSpec,
}

/// A Proxmox VE node reached with an API token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxmoxSpec {
    /// `https://host:8006` (plain http only for loopback).
    pub endpoint: String,
    pub node: String,
    pub token: TokenSource,
    /// The template VMs are cloned from when their image has no template
    /// pushed by `agentvm image push`.
    pub template: Option<TemplateRef>,
    pub storage: Option<String>,
    pub pool: Option<String>,
    pub full_clone: bool,
    pub tls: TlsMode,
    /// The port the guests' SSH listens on.
    pub ssh_port: u16,
    /// The storage `image push` uploads to (one with `import` content); by
    /// default the placement node's first such storage. Left out of the
    /// serialized form when unset, like `bridge`, so the VMs' spec hashes of
    /// fleet files without them stay as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_storage: Option<String>,
    /// The bridge of pushed templates' network card; `vmbr0` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

/// The bridge pushed templates use unless `bridge` names another.
pub const DEFAULT_BRIDGE: &str = "vmbr0";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    Env(String),
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateRef {
    Id(u32),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// The certificate must verify against the system's roots.
    Verified,
    /// The certificate's SHA-256 fingerprint must be this (`AA:BB:…`).
    Fingerprint(String),
    /// No verification at all (warned about loudly).
    Insecure,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub name: Name,
    pub source: ImageSource,
    /// The image runs qemu-guest-agent: `up` waits for it and `down` asks it first.
    pub agent: bool,
    /// Where the guest keeps its SSH host public key (read by `agentvm hostkey`).
    pub host_key: String,
    /// A stock cloud image: each start gets a NoCloud seed disk (`cidata`) with
    /// the SSH keys, host name and env, so cloud-init looks nowhere else.
    pub cloud_init: bool,
}

/// Where an image comes from. Paths are absolute (resolved against the fleet file's folder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageSource {
    /// A qcow2 or raw disk image to import.
    File(PathBuf),
    /// A NixOS flake output to build: `flake#attr`, where a path flake
    /// (`.#attr` in the file) is made absolute against the fleet file's folder.
    Flake(String),
    /// Direct kernel boot, optionally with a root disk image.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: Option<String>,
        disk: Option<PathBuf>,
    },
}

/// One VM, with every default applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: Name,
    /// The image; VMs on a Proxmox backend are cloned from the template
    /// `agentvm image push` made of it, else from the backend's `template`.
    pub image: Option<Name>,
    pub cpus: u32,
    pub memory: Size,
    /// Disk size; `None` keeps the base image's size.
    pub disk: Option<Size>,
    pub user: String,
    pub ssh_port: Option<u16>,
    pub spice_port: Option<u16>,
    pub readonly: bool,
    pub backend: String,
    pub env: BTreeMap<String, String>,
    /// Names of variables `agentvm up` copies from its own environment into
    /// `env` (see [`VmSpec::with_passed_env`]); never their values.
    pub pass_env: Vec<String>,
    pub secrets: Vec<PathBuf>,
    pub nixos: Option<String>,
    pub purpose: Option<String>,
    /// Public key lines (files named in `ssh_keys` already read).
    pub ssh_keys: Vec<String>,
    pub accel: Accel,
    /// A pinned VMID (Proxmox).
    pub vmid: Option<u32>,
    /// The host `ssh` connects to instead of the address the guest agent
    /// reports (Proxmox VMs behind NAT or with a DNS name).
    pub ssh_host: Option<String>,
    /// Host ports forwarded into the guest (local VMs only).
    #[serde(default)]
    pub forwards: Vec<Forward>,
    /// Host folders shared with the guest (local VMs only).
    #[serde(default)]
    pub shares: Vec<Share>,
    /// What the guest may reach outside (local VMs only, unless `open`).
    #[serde(default)]
    pub egress: Egress,
    /// `tailscale = { auth_key = { file = "…" } }`: `agentvm deploy` enrols
    /// the VM in a tailnet with the key read from that file.
    #[serde(default)]
    pub tailscale: Option<Tailscale>,
}

/// How `agentvm deploy` enrols a VM in a tailnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tailscale {
    /// The file holding the auth key (absolute); it reaches the guest through
    /// the guest agent as a private file, never on a command line.
    pub auth_key_file: PathBuf,
}

/// The most a VM's env may hold, as `KEY=VALUE` lines (64 KiB).
pub const MAX_ENV_BYTES: usize = 64 * 1024;

/// The env as the guest gets it: one `KEY=VALUE` line per variable.
pub fn env_file(env: &BTreeMap<String, String>) -> String {
    env.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

fn env_file_size(env: &BTreeMap<String, String>) -> usize {
    env.iter().map(|(k, v)| k.len() + v.len() + 2).sum()
}

/// The part of a [`VmSpec`] that makes the machine: what a backend puts into the
/// VM's definition, so a change to any of it means the VM must be redefined (or,
/// while it runs, restarted) to match. A backend hashes this view, never the
/// whole spec, to decide that.
///
/// In: the image, cpus, memory, disk size, pinned SSH and SPICE ports, the
/// names of the `env` and `pass_env` variables (their values are delivered from
/// a private file at every start and are never part of a definition or a hash),
/// the SSH keys (SMBIOS credentials on libvirt, cloud-init keys on Proxmox), and the login user (libvirt keeps it
/// in the domain metadata that `agentvm ssh` reads; Proxmox sets it as `ciuser`).
///
/// Out: the name (it identifies the VM, it does not configure it), `readonly`
/// and `purpose` (read from the spec whenever there is one), `secrets` and
/// `nixos` (used by `secrets rekey` and `provision` against a running guest),
/// the backend name and `vmid` (where the VM lives, not what it is), and the
/// `accel` preference (a backend hashes the accelerator it resolved instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineSpec<'a> {
    pub image: Option<&'a Name>,
    pub cpus: u32,
    pub memory: Size,
    pub disk: Option<Size>,
    pub user: &'a str,
    pub ssh_port: Option<u16>,
    pub spice_port: Option<u16>,
    /// The names in `env` and `pass_env`; never the values, which travel
    /// outside the machine's definition and may change between starts.
    pub env: std::collections::BTreeSet<&'a str>,
    pub ssh_keys: &'a [String],
}

impl VmSpec {
    /// This spec with the `pass_env` variables' values (from `lookup`, the
    /// environment of the command that runs `up`) added to `env`. A listed
    /// variable that is unset, a value with a control character or an env over
    /// [`MAX_ENV_BYTES`] is an error naming the variable.
    pub fn with_passed_env(
        mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let name = self.name.clone();
        for var in &self.pass_env {
            let value = lookup(var).ok_or_else(|| {
                format!(
                    "vms.{name}.pass_env: {var} is not set in this command's environment \
                     (export it, or remove it from pass_env)"
                )
            })?;
            if value.chars().any(|c| c.is_control() && c != '\t') {
                return Err(format!(
                    "vms.{name}.pass_env: the value of {var} has a newline or control character; \
                     env values are single lines"
                ));
            }
            self.env.insert(var.clone(), value);
        }
        let size = env_file_size(&self.env);
        if size > MAX_ENV_BYTES {
            return Err(format!(
                "vms.{name}: env with pass_env is {size} bytes; the limit is {MAX_ENV_BYTES} bytes (64 KiB)"
            ));
        }
        Ok(self)
    }

    /// The view of this spec that decides whether the machine must change.
    pub fn machine(&self) -> MachineSpec<'_> {
        MachineSpec {
            image: self.image.as_ref(),
            cpus: self.cpus,
            memory: self.memory,
            disk: self.disk,
            user: &self.user,
            ssh_port: self.ssh_port,
            spice_port: self.spice_port,
            env: self
                .env
                .keys()
                .map(String::as_str)
                .chain(self.pass_env.iter().map(String::as_str))
                .collect(),
            ssh_keys: &self.ssh_keys,
        }
    }
}

/// The folder of the fleet file `file` (`.` for a bare file name): relative
/// paths, the flake and the project's folders are found from here.
pub fn fleet_dir(file: &Path) -> &Path {
    file.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

impl Fleet {
    /// The fleet file: `explicit`, else `$AGENTVM_FILE`, else `agentvm.toml` in the
    /// current folder or the nearest parent that has one.
    pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, SpecError> {
        if let Some(path) = explicit {
            return Ok(path.to_path_buf());
        }
        if let Some(path) = non_empty_env(ENV_FILE) {
            return Ok(PathBuf::from(path));
        }
        let cwd = std::env::current_dir().map_err(|e| SpecError::Io {
            file: PathBuf::from("."),
            message: e.to_string(),
        })?;
        cwd.ancestors()
            .map(|dir| dir.join(FLEET_FILE))
            .find(|candidate| candidate.is_file())
            .ok_or(SpecError::NotFound { start: cwd })
    }

    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError::Io {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    /// Parses fleet text; `path` names the file in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self, SpecError> {
        let at = Locator { file: path, text };
        let raw: RawFleet = toml::Deserializer::parse(text)
            .map_err(|e| at.toml_error("", &e))
            .and_then(|de| {
                serde_path_to_error::deserialize(de)
                    .map_err(|e| at.toml_error(&e.path().to_string(), e.inner()))
            })?;
        let key_spans: KeySpans = toml::from_str(text).unwrap_or_default();
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base_dir = if base_dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base_dir
        };
        let resolver = Resolver {
            at,
            base_dir,
            key_spans,
        };
        resolver.resolve(raw)
    }

    pub fn vm(&self, name: &str) -> Result<&VmSpec, SpecError> {
        self.vms.get(name).ok_or_else(|| SpecError::UnknownVm {
            file: self.file.clone(),
            name: name.to_string(),
            known: self.vms.keys().map(Name::to_string).collect(),
        })
    }

    /// The image of a VM on the local backend.
    pub fn image_of(&self, vm: &VmSpec) -> Result<&ImageSpec, SpecError> {
        vm.image
            .as_ref()
            .and_then(|name| self.images.get(name))
            .ok_or_else(|| SpecError::Invalid {
                file: self.file.clone(),
                line: 0,
                column: 0,
                field: format!("vms.{}.image", vm.name),
                message: "this VM has no image".to_string(),
            })
    }

    pub fn backend(&self, name: &str) -> Option<&BackendSpec> {
        self.backends.get(name)
    }
}

#[cfg(test)]
mod tests;
