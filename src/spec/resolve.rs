//! Resolving the raw fleet file into validated specs: `[defaults]` applied,
//! paths made absolute, every value checked, errors as `file:line:column: field`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::raw::{self, KeySpans, RawFleet, RawImage, RawVm};
use super::*;

/// Turns byte spans into `file:line:column` errors.
pub(super) struct Locator<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
}

impl Locator<'_> {
    fn line_col(&self, span: Option<Range<usize>>) -> (usize, usize) {
        let Some(span) = span else { return (0, 0) };
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, col)
    }

    pub(super) fn error(
        &self,
        span: Option<Range<usize>>,
        field: &str,
        message: String,
    ) -> SpecError {
        let (line, column) = self.line_col(span);
        SpecError::Invalid {
            file: self.file.to_path_buf(),
            line,
            column,
            field: field.to_string(),
            message,
        }
    }

    pub(super) fn toml_error(&self, path: &str, e: &toml::de::Error) -> SpecError {
        let field = if path == "." { "" } else { path };
        self.error(e.span(), field, e.message().trim().to_string())
    }
}

pub(super) struct Resolver<'a> {
    pub(super) at: Locator<'a>,
    pub(super) base_dir: PathBuf,
    pub(super) key_spans: KeySpans,
}

impl Resolver<'_> {
    pub(super) fn resolve(&self, raw: RawFleet) -> Result<Fleet, SpecError> {
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
            let cloud_init = image.cloud_init;
            let source = self.image_source(&name, image)?;
            images.insert(
                name.clone(),
                ImageSpec {
                    name,
                    source,
                    agent,
                    host_key,
                    cloud_init,
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

    pub(super) fn key_span(&self, table: &str, key: &str) -> Option<Range<usize>> {
        let keys = match table {
            "images" => &self.key_spans.images,
            "backends" => &self.key_spans.backends,
            _ => &self.key_spans.vms,
        };
        keys.keys().find(|k| k.get_ref() == key).map(Spanned::span)
    }

    pub(super) fn table_name(&self, table: &str, key: &str) -> Result<Name, SpecError> {
        Name::new(key).map_err(|e| {
            self.at.error(
                self.key_span(table, key),
                &format!("{table}.{key}"),
                e.to_string(),
            )
        })
    }

    pub(super) fn path(&self, text: &str) -> PathBuf {
        let expanded = match (text.strip_prefix("~/"), non_empty_env("HOME")) {
            (Some(rest), Some(home)) => Path::new(&home).join(rest),
            _ => PathBuf::from(text),
        };
        self.base_dir.join(expanded)
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
                        format!(
                            "invalid variable name {bad:?}: use letters, digits and '_', not starting with a digit"
                        ),
                    ));
                }
                env.get_ref().clone()
            }
        };

        let (pass_value, pass_field) = match (&vm.pass_env, &defaults.pass_env) {
            (Some(v), _) => (Some(v), field("pass_env")),
            (None, Some(d)) => (Some(d), "defaults.pass_env".to_string()),
            (None, None) => (None, String::new()),
        };
        let mut pass_env: Vec<String> = Vec::new();
        if let Some(names) = pass_value {
            for var in names.get_ref() {
                let problem = if !is_env_key(var) {
                    Some(format!(
                        "invalid variable name {var:?}: use letters, digits and '_', not starting with a digit"
                    ))
                } else if env.contains_key(var) {
                    Some(format!(
                        "{var} is also set in env; a variable comes from env or from pass_env, not both"
                    ))
                } else if pass_env.contains(var) {
                    Some(format!("{var} is listed twice"))
                } else {
                    None
                };
                if let Some(message) = problem {
                    return Err(self.at.error(Some(names.span()), &pass_field, message));
                }
                pass_env.push(var.clone());
            }
        }
        if let Some(table) = &vm.env {
            let size = super::env_file(&env).len();
            if size > super::MAX_ENV_BYTES {
                return Err(self.at.error(
                    Some(table.span()),
                    &field("env"),
                    format!(
                        "env is {size} bytes as KEY=VALUE lines; the limit is {} bytes (64 KiB)",
                        super::MAX_ENV_BYTES
                    ),
                ));
            }
        }

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

        if let Some(host) = &vm.ssh_host
            && (host.is_empty()
                || host.starts_with('-')
                || host.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(self.at.error(
                self.key_span("vms", name.as_str()),
                &field("ssh_host"),
                format!("invalid host {host:?}: expected a host name or an address"),
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

        let (forwards_value, forwards_field) = match (&vm.forwards, &defaults.forwards) {
            (Some(v), _) => (Some(v), field("forwards")),
            (None, Some(d)) => (Some(d), "defaults.forwards".to_string()),
            (None, None) => (None, String::new()),
        };
        let mut forwards: Vec<Forward> = Vec::new();
        if let Some(entries) = forwards_value {
            let fail = |message: String| {
                self.at
                    .error(Some(entries.span()), &forwards_field, message)
            };
            if backend != LOCAL_BACKEND && !entries.get_ref().is_empty() {
                return Err(fail(format!(
                    "VM {name} is on backend {backend:?}: Proxmox VMs are reached on their own address; \
                     open the port in the guest's firewall (set forwards = [] on this VM to override [defaults])"
                )));
            }
            for text in entries.get_ref() {
                let forward = Forward::parse(text).map_err(&fail)?;
                let pinned = [("ssh_port", vm.ssh_port), ("spice_port", vm.spice_port)];
                if let Some((key, _)) = pinned
                    .iter()
                    .find(|(_, p)| p.is_some_and(|p| p.0 == forward.host_port))
                {
                    return Err(fail(format!(
                        "{text:?}: host port {} is this VM's {key}",
                        forward.host_port
                    )));
                }
                if forwards.iter().any(|f| f.host_port == forward.host_port) {
                    return Err(fail(format!(
                        "{text:?}: host port {} is listed twice",
                        forward.host_port
                    )));
                }
                forwards.push(forward);
            }
        }

        let shares = self.shares(name, &backend, vm.shares.as_ref(), defaults.shares.as_ref())?;
        let egress = super::resolve_egress::resolve(
            &self.at,
            name,
            &backend,
            vm.egress.as_ref(),
            defaults.egress.as_ref(),
        )?;

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
            pass_env,
            secrets: vm.secrets.iter().map(|s| self.path(s)).collect(),
            nixos: vm.nixos,
            purpose: vm.purpose,
            ssh_keys,
            ssh_host: vm.ssh_host,
            forwards,
            shares,
            egress,
            tailscale: vm.tailscale.as_ref().map(|t| super::Tailscale {
                auth_key_file: self.path(&t.get_ref().auth_key.file),
            }),
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
pub(super) fn has_control(text: &str, allow_newline: bool) -> bool {
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

/// `[A-Za-z_][A-Za-z0-9_]*`: a name an env variable may have.
pub fn is_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
