//! The fleet file `agentvm.toml`: finding it, parsing it, and resolving each VM
//! against `[defaults]` into a complete, validated [`VmSpec`].

mod error;
mod name;
mod raw;
mod size;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use error::SpecError;
pub use name::{MAX_NAME_LEN, Name, NameError};
pub use raw::Accel;
pub use size::{GIB, KIB, MIB, Size, SizeError};

use crate::paths::{ENV_FILE, FLEET_FILE, non_empty_env};
use raw::{KeySpans, RawFleet, RawImage, RawVm};

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
    pub template: TemplateRef,
    pub storage: Option<String>,
    pub pool: Option<String>,
    pub full_clone: bool,
    pub tls: TlsMode,
    /// The port the guests' SSH listens on.
    pub ssh_port: u16,
}

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
    /// The image; VMs on a Proxmox backend are cloned from its template instead.
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
    pub secrets: Vec<PathBuf>,
    pub nixos: Option<String>,
    pub purpose: Option<String>,
    /// Public key lines (files named in `ssh_keys` already read).
    pub ssh_keys: Vec<String>,
    pub accel: Accel,
    /// A pinned VMID (Proxmox).
    pub vmid: Option<u32>,
}

/// The part of a [`VmSpec`] that makes the machine: what a backend puts into the
/// VM's definition, so a change to any of it means the VM must be redefined (or,
/// while it runs, restarted) to match. A backend hashes this view, never the
/// whole spec, to decide that.
///
/// In: the image, cpus, memory, disk size, pinned SSH and SPICE ports, the `env`
/// table and the SSH keys (both delivered to the guest as SMBIOS credentials on
/// libvirt, as cloud-init keys on Proxmox), and the login user (libvirt keeps it
/// in the domain metadata that `agentvm ssh` reads; Proxmox sets it as `ciuser`).
///
/// Out: the name (it identifies the VM, it does not configure it), `readonly`
/// and `purpose` (read from the spec whenever there is one), `secrets` and
/// `nixos` (used by `secrets rekey` and `provision` against a running guest),
/// the backend name and `vmid` (where the VM lives, not what it is), and the
/// `accel` preference (a backend hashes the accelerator it resolved instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MachineSpec<'a> {
    pub image: Option<&'a Name>,
    pub cpus: u32,
    pub memory: Size,
    pub disk: Option<Size>,
    pub user: &'a str,
    pub ssh_port: Option<u16>,
    pub spice_port: Option<u16>,
    pub env: &'a BTreeMap<String, String>,
    pub ssh_keys: &'a [String],
}

impl VmSpec {
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
            env: &self.env,
            ssh_keys: &self.ssh_keys,
        }
    }
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

/// Turns byte spans into `file:line:column` errors.
struct Locator<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn line_col(&self, span: Option<Range<usize>>) -> (usize, usize) {
        let Some(span) = span else { return (0, 0) };
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, col)
    }

    fn error(&self, span: Option<Range<usize>>, field: &str, message: String) -> SpecError {
        let (line, column) = self.line_col(span);
        SpecError::Invalid {
            file: self.file.to_path_buf(),
            line,
            column,
            field: field.to_string(),
            message,
        }
    }

    fn toml_error(&self, path: &str, e: &toml::de::Error) -> SpecError {
        let field = if path == "." { "" } else { path };
        self.error(e.span(), field, e.message().trim().to_string())
    }
}

struct Resolver<'a> {
    at: Locator<'a>,
    base_dir: PathBuf,
    key_spans: KeySpans,
}

impl Resolver<'_> {
    fn resolve(&self, raw: RawFleet) -> Result<Fleet, SpecError> {
        let mut images = BTreeMap::new();
        for (key, image) in raw.images {
            let name = self.table_name("images", &key)?;
            let agent = image.agent.unwrap_or(true);
            let host_key = match image.host_key.clone() {
                None => DEFAULT_HOST_KEY.to_string(),
                Some(path) if path.starts_with('/') && !has_control(&path, false) => path,
                Some(path) => {
                    return Err(self.at.error(
                        self.key_span("images", name.as_str()),
                        &format!("images.{name}.host_key"),
                        format!("{path:?} must be an absolute path in the guest"),
                    ));
                }
            };
            let source = self.image_source(&name, image)?;
            images.insert(
                name.clone(),
                ImageSpec {
                    name,
                    source,
                    agent,
                    host_key,
                },
            );
        }
        let mut backends = BTreeMap::new();
        for (key, backend) in raw.backends {
            let name = self.table_name("backends", &key)?;
            if name.as_str() == LOCAL_BACKEND {
                return Err(self.at.error(
                    self.key_span("backends", &key),
                    "backends.local",
                    "`local` is the built-in libvirt backend; give this one another name".into(),
                ));
            }
            let spec = self.backend(&name, backend)?;
            backends.insert(
                name.clone(),
                BackendSpec {
                    name,
                    proxmox: spec,
                },
            );
        }
        let mut vms = BTreeMap::new();
        for (key, vm) in raw.vms {
            let name = self.table_name("vms", &key)?;
            let spec = self.vm(&name, vm, &raw.defaults, &images, &backends)?;
            vms.insert(name, spec);
        }
        Ok(Fleet {
            file: self.at.file.to_path_buf(),
            images,
            vms,
            backends,
        })
    }

    fn key_span(&self, table: &str, key: &str) -> Option<Range<usize>> {
        let keys = match table {
            "images" => &self.key_spans.images,
            "backends" => &self.key_spans.backends,
            _ => &self.key_spans.vms,
        };
        keys.keys().find(|k| k.get_ref() == key).map(Spanned::span)
    }

    fn table_name(&self, table: &str, key: &str) -> Result<Name, SpecError> {
        Name::new(key).map_err(|e| {
            self.at.error(
                self.key_span(table, key),
                &format!("{table}.{key}"),
                e.to_string(),
            )
        })
    }

    fn path(&self, text: &str) -> PathBuf {
        let expanded = match (text.strip_prefix("~/"), non_empty_env("HOME")) {
            (Some(rest), Some(home)) => Path::new(&home).join(rest),
            _ => PathBuf::from(text),
        };
        self.base_dir.join(expanded)
    }

    fn backend(&self, name: &Name, raw: raw::RawBackend) -> Result<ProxmoxSpec, SpecError> {
        let field = |key: &str| format!("backends.{name}.{key}");
        if raw.kind.get_ref() != "proxmox" {
            return Err(self.at.error(
                Some(raw.kind.span()),
                &field("kind"),
                format!(
                    "unknown backend kind {:?} (known: proxmox)",
                    raw.kind.get_ref()
                ),
            ));
        }
        let endpoint = raw.endpoint.get_ref().trim_end_matches('/').to_string();
        let bad_endpoint = |why: &str| {
            self.at.error(
                Some(raw.endpoint.span()),
                &field("endpoint"),
                why.to_string(),
            )
        };
        match endpoint.split_once("://") {
            Some(("https", host)) if !host.is_empty() => {}
            Some(("http", host)) if is_loopback_host(host) => {}
            Some(("http", _)) => {
                return Err(bad_endpoint(
                    "plain http:// is only allowed for loopback endpoints; use https://",
                ));
            }
            _ => return Err(bad_endpoint("expected https://host:8006")),
        }
        let token = match (raw.token.env, raw.token.file) {
            (Some(var), None) => TokenSource::Env(var),
            (None, Some(path)) => TokenSource::File(self.path(&path)),
            _ => {
                return Err(self.at.error(
                    self.key_span("backends", name.as_str()),
                    &field("token"),
                    "token is { env = \"VAR\" } or { file = \"path\" }".into(),
                ));
            }
        };
        let (fingerprint, insecure) = match raw.tls {
            Some(tls) => (
                tls.fingerprint.or(raw.fingerprint),
                tls.insecure || raw.insecure,
            ),
            None => (raw.fingerprint, raw.insecure),
        };
        let tls = match (fingerprint, insecure) {
            (Some(_), true) => {
                return Err(self.at.error(
                    self.key_span("backends", name.as_str()),
                    &field("tls"),
                    "set either fingerprint or insecure, not both".into(),
                ));
            }
            (Some(fp), false) => {
                let hex: String = fp.get_ref().chars().filter(|c| *c != ':').collect();
                if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(self.at.error(
                        Some(fp.span()),
                        &field("fingerprint"),
                        "expected a SHA-256 fingerprint like \"AA:BB:…\" (32 bytes)".into(),
                    ));
                }
                TlsMode::Fingerprint(hex.to_ascii_uppercase())
            }
            (None, true) => TlsMode::Insecure,
            (None, false) => TlsMode::Verified,
        };
        Ok(ProxmoxSpec {
            endpoint,
            node: raw.node,
            token,
            template: match raw.template {
                raw::RawTemplate::Id(id) => TemplateRef::Id(id),
                raw::RawTemplate::Name(n) => TemplateRef::Name(n),
            },
            storage: raw.storage,
            pool: raw.pool,
            full_clone: raw.full_clone,
            tls,
            ssh_port: raw.ssh_port.unwrap_or(22),
        })
    }

    /// `./x#attr`, `.#attr`, `~/x#attr` and `/x#attr` become absolute; other
    /// flake references (`github:…#attr`) stay as written.
    fn flake_ref(&self, flake: &str) -> String {
        let (source, attr) = flake.split_once('#').unwrap_or((flake, ""));
        if source.starts_with('.') || source.starts_with('/') || source.starts_with("~/") {
            let dir = self.path(source);
            let dir = dir.canonicalize().unwrap_or(dir);
            format!("{}#{attr}", dir.display())
        } else {
            flake.to_string()
        }
    }

    fn image_source(&self, name: &Name, raw: RawImage) -> Result<ImageSource, SpecError> {
        let field = format!("images.{name}");
        let span = self.key_span("images", name.as_str());
        let fail = |message: &str| self.at.error(span.clone(), &field, message.to_string());
        match (raw.file, raw.flake, raw.kernel) {
            (_, Some(_), Some(_)) | (Some(_), Some(_), None) => {
                Err(fail("set only one of `file`, `flake` or `kernel`"))
            }
            (None, Some(flake), None) => {
                if raw.initrd.is_some() || raw.cmdline.is_some() {
                    return Err(fail("`initrd` and `cmdline` go with `kernel`, not `flake`"));
                }
                if flake.trim().is_empty() || !flake.contains('#') {
                    return Err(fail(
                        "`flake` must name a flake attribute, like \".#agent-base\"",
                    ));
                }
                Ok(ImageSource::Flake(self.flake_ref(&flake)))
            }
            (_, None, Some(_))
                if raw
                    .cmdline
                    .as_deref()
                    .is_some_and(|c| has_control(c, false)) =>
            {
                Err(fail("`cmdline` must not contain control characters"))
            }
            (file, None, Some(kernel)) => Ok(ImageSource::Kernel {
                kernel: self.path(&kernel),
                initrd: raw.initrd.as_deref().map(|p| self.path(p)),
                cmdline: raw.cmdline,
                disk: file.as_deref().map(|p| self.path(p)),
            }),
            (Some(file), None, None) => {
                if raw.initrd.is_some() || raw.cmdline.is_some() {
                    return Err(fail("`initrd` and `cmdline` need `kernel`"));
                }
                Ok(ImageSource::File(self.path(&file)))
            }
            (None, None, None) => Err(fail(
                "an image needs `file = \"path\"`, `flake = \".#attr\"` or `kernel = \"path\"`",
            )),
        }
    }

    fn vm(
        &self,
        name: &Name,
        vm: RawVm,
        defaults: &raw::RawDefaults,
        images: &BTreeMap<Name, ImageSpec>,
        backends: &BTreeMap<Name, BackendSpec>,
    ) -> Result<VmSpec, SpecError> {
        let field = |key: &str| format!("vms.{name}.{key}");

        let (backend_text, backend_field) = match (&vm.backend, &defaults.backend) {
            (Some(v), _) => (Some(v), field("backend")),
            (None, Some(d)) => (Some(d), "defaults.backend".to_string()),
            (None, None) => (None, String::new()),
        };
        let backend = match backend_text {
            None => LOCAL_BACKEND.to_string(),
            Some(b)
                if b.get_ref() == LOCAL_BACKEND || backends.contains_key(b.get_ref().as_str()) =>
            {
                b.get_ref().clone()
            }
            Some(b) => {
                let mut known = vec![LOCAL_BACKEND.to_string()];
                known.extend(backends.keys().map(Name::to_string));
                return Err(self.at.error(
                    Some(b.span()),
                    &backend_field,
                    format!(
                        "unknown backend {:?} (available: {})",
                        b.get_ref(),
                        known.join(", ")
                    ),
                ));
            }
        };

        let (image_text, image_field) = match (&vm.image, &defaults.image) {
            (Some(v), _) => (v, field("image")),
            (None, Some(d)) => (d, "defaults.image".to_string()),
            (None, None) if backend != LOCAL_BACKEND => {
                return self.vm_rest(name, vm, defaults, None, backend);
            }
            (None, None) => {
                return Err(self.at.error(
                    self.key_span("vms", name.as_str()),
                    &field("image"),
                    "no image: set `image` here or in [defaults]".to_string(),
                ));
            }
        };
        let image = Name::new(image_text.get_ref())
            .ok()
            .filter(|n| images.contains_key(n))
            .ok_or_else(|| {
                let known: Vec<_> = images.keys().map(Name::as_str).collect();
                self.at.error(
                    Some(image_text.span()),
                    &image_field,
                    format!(
                        "unknown image {:?} (defined images: {})",
                        image_text.get_ref(),
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                )
            })?;

        self.vm_rest(name, vm, defaults, Some(image), backend)
    }

    /// Everything of a VM but its image and backend.
    fn vm_rest(
        &self,
        name: &Name,
        vm: RawVm,
        defaults: &raw::RawDefaults,
        image: Option<Name>,
        backend: String,
    ) -> Result<VmSpec, SpecError> {
        let field = |key: &str| format!("vms.{name}.{key}");
        let user = match &vm.user {
            None => DEFAULT_USER.to_string(),
            Some(u) if is_unix_user(u.get_ref()) => u.get_ref().clone(),
            Some(u) => {
                return Err(self.at.error(
                    Some(u.span()),
                    &field("user"),
                    format!("invalid user name {:?}", u.get_ref()),
                ));
            }
        };

        let env = match &vm.env {
            None => BTreeMap::new(),
            Some(env) => {
                if let Some(bad) = env.get_ref().keys().find(|k| !is_env_key(k)) {
                    return Err(self.at.error(
                        Some(env.span()),
                        &field("env"),
                        format!("invalid variable name {bad:?}: use letters, digits and '_'"),
                    ));
                }
                env.get_ref().clone()
            }
        };

        let (keys_value, keys_field) = match (&vm.ssh_keys, &defaults.ssh_keys) {
            (Some(v), _) => (Some(v), field("ssh_keys")),
            (None, Some(d)) => (Some(d), "defaults.ssh_keys".to_string()),
            (None, None) => (None, String::new()),
        };
        let ssh_keys = match keys_value {
            None => Vec::new(),
            Some(keys) => self
                .ssh_keys(keys.get_ref())
                .map_err(|m| self.at.error(Some(keys.span()), &keys_field, m))?,
        };

        for (key, value, allow_newline) in [
            ("purpose", vm.purpose.as_deref(), true),
            ("nixos", vm.nixos.as_deref(), false),
        ] {
            if value.is_some_and(|v| has_control(v, allow_newline)) {
                return Err(self.at.error(
                    self.key_span("vms", name.as_str()),
                    &field(key),
                    "control characters are not allowed".to_string(),
                ));
            }
        }
        if let Some(env) = &vm.env
            && env.get_ref().values().any(|v| has_control(v, false))
        {
            return Err(self.at.error(
                Some(env.span()),
                &field("env"),
                "control characters are not allowed in values".to_string(),
            ));
        }

        if let (Some(ssh), Some(spice)) = (vm.ssh_port, vm.spice_port)
            && ssh == spice
        {
            return Err(self.at.error(
                self.key_span("vms", name.as_str()),
                &field("spice_port"),
                format!("ssh_port and spice_port are both {}", ssh.0),
            ));
        }

        Ok(VmSpec {
            name: name.clone(),
            image,
            cpus: vm.cpus.or(defaults.cpus).map_or(DEFAULT_CPUS, |c| c.0),
            memory: vm.memory.or(defaults.memory).unwrap_or(DEFAULT_MEMORY),
            disk: vm.disk.or(defaults.disk),
            user,
            ssh_port: vm.ssh_port.map(|p| p.0),
            spice_port: vm.spice_port.map(|p| p.0),
            readonly: vm.readonly,
            backend,
            env,
            secrets: vm.secrets.iter().map(|s| self.path(s)).collect(),
            nixos: vm.nixos,
            purpose: vm.purpose,
            ssh_keys,
            accel: vm.accel.or(defaults.accel).unwrap_or_default(),
            vmid: match vm.vmid {
                Some(id) if !(100..=999_999_999).contains(&id) => {
                    return Err(self.at.error(
                        self.key_span("vms", name.as_str()),
                        &field("vmid"),
                        format!("invalid vmid {id}: expected 100 to 999999999"),
                    ));
                }
                other => other,
            },
        })
    }

    /// Key lines stay as they are; anything else is a file of key lines.
    fn ssh_keys(&self, entries: &[String]) -> Result<Vec<String>, String> {
        let mut keys = Vec::new();
        for entry in entries {
            let entry = entry.trim();
            if looks_like_key(entry) {
                keys.push(valid_key_line(entry)?);
                continue;
            }
            let path = self.path(entry);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read public key file {}: {e}", path.display()))?;
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                keys.push(valid_key_line(line).map_err(|m| format!("{}: {m}", path.display()))?);
            }
        }
        Ok(keys)
    }
}

/// `127.0.0.1:8006`, `localhost`, `[::1]:8006`…
fn is_loopback_host(authority: &str) -> bool {
    let host = authority.split('/').next().unwrap_or("");
    let host = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn looks_like_key(entry: &str) -> bool {
    ["ssh-", "ecdsa-", "sk-"]
        .iter()
        .any(|p| entry.starts_with(p))
}

fn valid_key_line(line: &str) -> Result<String, String> {
    let mut parts = line.split_whitespace();
    let kind = parts.next().unwrap_or_default();
    let blob = parts.next().unwrap_or_default();
    let ok = looks_like_key(kind)
        && !blob.is_empty()
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
        && !line.chars().any(char::is_control);
    if ok {
        Ok(line.to_string())
    } else {
        Err(format!("not an SSH public key line: {line:?}"))
    }
}

/// XML cannot carry most control characters, and libvirt's C API stops at NUL.
fn has_control(text: &str, allow_newline: bool) -> bool {
    text.chars()
        .any(|c| c.is_control() && c != '\t' && !(allow_newline && c == '\n'))
}

fn is_unix_user(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name.len() <= 32
}

fn is_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests;
