//! The Proxmox VE backend: the same `[vms.NAME]` spec, cloned from a template on
//! a Proxmox node through its API with a token.

mod client;
mod tls;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use serde_json::Value;

use super::{
    Backend, BackendError, Change, DownPath, Phase, Plan, Result, State, UpAction, UpOutcome,
    VmStatus,
};
use crate::paths::Home;
use crate::progress::Reporter;
use crate::spec::{GIB, ImageSpec, ProxmoxSpec, TemplateRef, VmSpec};
use crate::ssh::{Endpoint, Identity};
pub use client::{Client, PveError, encode_ssh_keys, read_token};

/// First line of the description of every VM agentvm manages on Proxmox.
pub const MARKER: &str = "agentvm: managed";
/// Attempts at a fresh VMID when another client takes ours in between.
const NEXTID_ATTEMPTS: u32 = 5;
const POLL: Duration = Duration::from_millis(500);

/// What agentvm keeps in a Proxmox VM's description.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marker {
    pub spec_hash: String,
    pub readonly: bool,
    pub user: String,
}

impl Marker {
    pub fn render(&self, purpose: Option<&str>) -> String {
        let mut text = format!(
            "{MARKER}\nspec-hash: {}\nreadonly: {}\nuser: {}\n",
            self.spec_hash, self.readonly, self.user
        );
        if let Some(purpose) = purpose {
            text.push_str(&format!("purpose: {purpose}\n"));
        }
        text
    }

    pub fn parse(description: &str) -> Option<Self> {
        let mut lines = description.lines();
        if lines.next()?.trim() != MARKER {
            return None;
        }
        let mut marker = Marker::default();
        for line in lines {
            match line.split_once(": ") {
                Some(("spec-hash", v)) => marker.spec_hash = v.trim().to_string(),
                Some(("readonly", v)) => marker.readonly = v.trim() == "true",
                Some(("user", v)) => marker.user = v.trim().to_string(),
                _ => {}
            }
        }
        Some(marker)
    }
}

/// A VM on the node, as agentvm sees it.
#[derive(Debug, Clone)]
struct Found {
    vmid: u32,
    running: bool,
    marker: Option<Marker>,
    config: Value,
}

pub struct ProxmoxBackend {
    name: String,
    spec: ProxmoxSpec,
    client: Client,
    home: Home,
    identity: Identity,
}

impl ProxmoxBackend {
    pub fn connect(name: &str, spec: &ProxmoxSpec, home: Home) -> anyhow::Result<Self> {
        home.ensure()?;
        Ok(Self {
            name: name.to_string(),
            client: Client::new(name, spec)?,
            spec: spec.clone(),
            identity: Identity::ensure(&home)?,
            home,
        })
    }

    fn node_path(&self, rest: &str) -> String {
        format!("/nodes/{}{rest}", self.spec.node)
    }

    fn vm_path(&self, vmid: u32, rest: &str) -> String {
        self.node_path(&format!("/qemu/{vmid}{rest}"))
    }

    /// Every VM on the cluster: (vmid, name, node, template, pool, running).
    fn resources(&self) -> Result<Vec<Value>> {
        let list = self
            .client
            .get("/cluster/resources", &[("type", "vm".into())])
            .map_err(pve)?;
        Ok(list.as_array().cloned().unwrap_or_default())
    }

    fn find(&self, name: &str) -> Result<Option<Found>> {
        match self.resources()?.into_iter().find(|r| {
            r["name"] == name && r["node"] == self.spec.node.as_str() && r["template"] != 1
        }) {
            Some(resource) => Ok(Some(self.found(&resource)?)),
            None => Ok(None),
        }
    }

    /// A VM from its `/cluster/resources` entry, with its config and marker.
    fn found(&self, resource: &Value) -> Result<Found> {
        let vmid = resource["vmid"].as_u64().context("resource without vmid")? as u32;
        let config = self
            .client
            .get(&self.vm_path(vmid, "/config"), &[])
            .map_err(pve)?;
        let marker = config["description"].as_str().and_then(Marker::parse);
        Ok(Found {
            vmid,
            running: resource["status"] == "running",
            marker,
            config,
        })
    }

    /// The VM `name`, which must have been made by agentvm.
    fn managed(&self, name: &str) -> Result<(Found, Marker)> {
        let found = self
            .find(name)?
            .ok_or_else(|| BackendError::NotFound(name.to_string()))?;
        let marker = found.marker.clone().ok_or_else(|| {
            anyhow!(
                "VM {name} (vmid {}) on {} was not created by agentvm; refusing to touch it",
                found.vmid,
                self.name
            )
        })?;
        Ok((found, marker))
    }

    fn template_vmid(&self) -> Result<u32> {
        match &self.spec.template {
            TemplateRef::Id(id) => Ok(*id),
            TemplateRef::Name(name) => self
                .resources()?
                .iter()
                .find(|r| r["name"] == name.as_str() && r["template"] == 1)
                .and_then(|r| r["vmid"].as_u64())
                .map(|id| id as u32)
                .ok_or_else(|| anyhow!("backend {}: no template named {name}", self.name).into()),
        }
    }

    fn spec_hash(&self, spec: &VmSpec) -> String {
        let canonical = serde_json::to_vec(&(spec, &self.spec)).expect("specs serialize to JSON");
        format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&canonical))
        )
    }

    /// Clones the template into a new VM: the pinned VMID, or `/cluster/nextid`
    /// again whenever another client took the id between asking and cloning.
    fn clone_vm(&self, spec: &VmSpec, progress: &dyn Reporter) -> Result<u32> {
        let name = spec.name.as_str();
        let template = self.template_vmid()?;
        let taken = |id: u32| -> Result<bool> {
            Ok(self
                .resources()?
                .iter()
                .any(|r| r["vmid"].as_u64() == Some(u64::from(id))))
        };
        if let Some(id) = spec.vmid
            && taken(id)?
        {
            return Err(anyhow!("vms.{name}.vmid = {id} is already used on {}", self.name).into());
        }
        for attempt in 1..=NEXTID_ATTEMPTS {
            let vmid = match spec.vmid {
                Some(id) => id,
                None => {
                    let next = self.client.get("/cluster/nextid", &[]).map_err(pve)?;
                    next.as_u64()
                        .or_else(|| next.as_str().and_then(|s| s.parse().ok()))
                        .context("nextid returned no number")? as u32
                }
            };
            let mut params = vec![
                ("newid", vmid.to_string()),
                ("name", name.to_string()),
                (
                    "full",
                    if self.spec.full_clone { "1" } else { "0" }.to_string(),
                ),
            ];
            if let Some(pool) = &self.spec.pool {
                params.push(("pool", pool.clone()));
            }
            if let (Some(storage), true) = (&self.spec.storage, self.spec.full_clone) {
                params.push(("storage", storage.clone()));
            }
            progress.step(name, &format!("cloning template {template} to vmid {vmid}"));
            match self.client.post(&self.vm_path(template, "/clone"), &params) {
                Ok(upid) => {
                    if let Err(e) = self.client.wait_task(&upid, "clone", progress, name) {
                        // The clone started: do not leave half a VM behind.
                        let _ = self.purge(vmid, progress, name);
                        return Err(e.into());
                    }
                    return Ok(vmid);
                }
                Err(PveError::Api { message, .. })
                    if message.contains("already exists")
                        && spec.vmid.is_none()
                        && attempt < NEXTID_ATTEMPTS =>
                {
                    progress.step(
                        name,
                        &format!("vmid {vmid} was taken meanwhile; asking for another"),
                    );
                }
                Err(e) => return Err(pve(e)),
            }
        }
        Err(anyhow!("no free vmid after {NEXTID_ATTEMPTS} attempts").into())
    }

    fn purge(&self, vmid: u32, progress: &dyn Reporter, name: &str) -> anyhow::Result<()> {
        let upid = self
            .client
            .delete(
                &self.vm_path(vmid, ""),
                &[
                    ("purge", "1".into()),
                    ("destroy-unreferenced-disks", "1".into()),
                ],
            )
            .map_err(|e| anyhow!(e))?;
        self.client.wait_task(&upid, "delete", progress, name)
    }

    /// Name, cores, memory, marker, cloud-init (user, keys, DHCP) and the guest agent.
    /// The config keys `up` sets: name, cores, memory, the marker, cloud-init
    /// (user, keys, DHCP) and the guest agent.
    fn desired_config(&self, spec: &VmSpec, hash: &str) -> Vec<(&'static str, String)> {
        let marker = Marker {
            spec_hash: hash.to_string(),
            readonly: spec.readonly,
            user: spec.user.clone(),
        };
        let mut keys = vec![self.identity.public_line.clone()];
        keys.extend(spec.ssh_keys.iter().cloned());
        vec![
            ("name", spec.name.to_string()),
            ("cores", spec.cpus.to_string()),
            ("memory", (spec.memory.bytes() / (1024 * 1024)).to_string()),
            ("description", marker.render(spec.purpose.as_deref())),
            ("ciuser", spec.user.clone()),
            ("sshkeys", encode_ssh_keys(&keys)),
            ("ipconfig0", "ip=dhcp".to_string()),
            ("agent", "1".to_string()),
        ]
    }

    fn configure(
        &self,
        vmid: u32,
        spec: &VmSpec,
        hash: &str,
        progress: &dyn Reporter,
    ) -> Result<()> {
        let params = self.desired_config(spec, hash);
        let upid = self
            .client
            .post(&self.vm_path(vmid, "/config"), &params)
            .map_err(pve)?;
        self.client
            .wait_task(&upid, "configure", progress, spec.name.as_str())
            .map_err(Into::into)
    }

    /// Grows the boot disk to the spec's size; never shrinks it.
    fn grow_disk(
        &self,
        vmid: u32,
        spec: &VmSpec,
        config: &Value,
        progress: &dyn Reporter,
    ) -> Result<()> {
        let Some(want) = spec.disk else { return Ok(()) };
        let name = spec.name.as_str();
        let Some((disk, have)) = boot_disk(config) else {
            return Err(anyhow!("{name}: the cloned VM has no disk to grow").into());
        };
        if want.bytes() <= have {
            if want.bytes() < have {
                progress.step(
                    name,
                    &format!("{disk} is larger than the spec's disk; disks are never shrunk"),
                );
            }
            return Ok(());
        }
        let size = format!("{}K", want.bytes() / 1024);
        let upid = self
            .client
            .put(
                &self.vm_path(vmid, "/resize"),
                &[("disk", disk.clone()), ("size", size)],
            )
            .map_err(pve)?;
        self.client
            .wait_task(&upid, "resize", progress, name)
            .map_err(Into::into)
    }

    fn start(&self, vmid: u32, name: &str, progress: &dyn Reporter) -> Result<()> {
        let upid = self
            .client
            .post(&self.vm_path(vmid, "/status/start"), &[])
            .map_err(pve)?;
        self.client
            .wait_task(&upid, "start", progress, name)
            .map_err(Into::into)
    }

    /// The guest's first routable address, from its agent.
    fn guest_ip(&self, vmid: u32) -> std::result::Result<Option<IpAddr>, PveError> {
        let reply = self
            .client
            .get(&self.vm_path(vmid, "/agent/network-get-interfaces"), &[])?;
        let interfaces = reply["result"].as_array().cloned().unwrap_or_default();
        Ok(interfaces
            .iter()
            .flat_map(|i| i["ip-addresses"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| {
                a["ip-address"]
                    .as_str()
                    .and_then(|s| s.parse::<IpAddr>().ok())
            })
            .find(|ip| match ip {
                IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
                IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
            }))
    }

    fn status_of(&self, name: &str, found: &Found, spec: Option<&VmSpec>) -> VmStatus {
        let readonly = spec.map_or(found.marker.as_ref().is_some_and(|m| m.readonly), |s| {
            s.readonly
        });
        let restart_needed = match (spec, &found.marker) {
            (Some(spec), Some(marker)) if found.running => self.spec_hash(spec) != marker.spec_hash,
            _ => false,
        };
        VmStatus {
            name: name.to_string(),
            state: if found.running {
                State::Running
            } else {
                State::Stopped
            },
            backend: self.name.clone(),
            ssh_port: Some(self.spec.ssh_port),
            spice_port: None,
            image: None,
            readonly,
            restart_needed,
            in_spec: spec.is_some(),
            purpose: spec.and_then(|s| s.purpose.clone()),
            ips: Vec::new(),
            agent: if found.running {
                "unknown".into()
            } else {
                "stopped".into()
            },
        }
    }
}

fn pve(e: PveError) -> BackendError {
    BackendError::Other(anyhow!(e))
}

/// The first disk of a config (`scsi0`, `virtio0`, …) and its size in bytes.
fn boot_disk(config: &Value) -> Option<(String, u64)> {
    let object = config.as_object()?;
    for bus in ["scsi", "virtio", "sata", "ide"] {
        for n in 0..31 {
            let key = format!("{bus}{n}");
            let Some(value) = object.get(&key).and_then(Value::as_str) else {
                continue;
            };
            if value.contains("media=cdrom") || value.contains("cloudinit") {
                continue;
            }
            let size = value
                .split(',')
                .find_map(|p| p.strip_prefix("size="))
                .and_then(parse_pve_size)?;
            return Some((key, size));
        }
    }
    None
}

/// `32G`, `512M`, `1T`, `4096K` → bytes.
fn parse_pve_size(text: &str) -> Option<u64> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit() && c != '.')?);
    let value: f64 = number.parse().ok()?;
    let factor = match unit {
        "K" => 1024.0,
        "M" => 1024.0 * 1024.0,
        "G" => GIB as f64,
        "T" => GIB as f64 * 1024.0,
        _ => return None,
    };
    Some((value * factor) as u64)
}

impl Backend for ProxmoxBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "proxmox"
    }

    fn up(
        &self,
        spec: &VmSpec,
        _image: Option<&ImageSpec>,
        progress: &dyn Reporter,
    ) -> Result<UpOutcome> {
        let name = spec.name.as_str();
        let hash = self.spec_hash(spec);
        let mut timings = Vec::new();
        let mut last = Instant::now();
        let mut mark = |phase: &str| {
            timings.push(Phase {
                phase: phase.to_string(),
                ms: last.elapsed().as_secs_f64() * 1000.0,
            });
            last = Instant::now();
        };
        let (action, restart_needed) = match self.find(name)? {
            None => {
                let vmid = self.clone_vm(spec, progress)?;
                mark("clone");
                let config = self
                    .client
                    .get(&self.vm_path(vmid, "/config"), &[])
                    .map_err(pve)?;
                self.configure(vmid, spec, &hash, progress)?;
                self.grow_disk(vmid, spec, &config, progress)?;
                mark("configure");
                self.start(vmid, name, progress)?;
                mark("start");
                (UpAction::Created, false)
            }
            Some(found) => {
                let marker = found.marker.clone().ok_or_else(|| {
                    anyhow!(
                        "VM {name} (vmid {}) was not created by agentvm; refusing to touch it",
                        found.vmid
                    )
                })?;
                if found.running {
                    (UpAction::AlreadyRunning, marker.spec_hash != hash)
                } else {
                    let changed = marker.spec_hash != hash;
                    if changed && (spec.readonly || marker.readonly) {
                        return Err(BackendError::ReadOnly {
                            name: name.to_string(),
                            action: "redefine",
                        });
                    }
                    if changed {
                        self.configure(found.vmid, spec, &hash, progress)?;
                        self.grow_disk(found.vmid, spec, &found.config, progress)?;
                        mark("configure");
                    }
                    self.start(found.vmid, name, progress)?;
                    mark("start");
                    (
                        if changed {
                            UpAction::Redefined
                        } else {
                            UpAction::Started
                        },
                        false,
                    )
                }
            }
        };
        Ok(UpOutcome {
            name: name.to_string(),
            action,
            restart_needed,
            ssh_port: self.spec.ssh_port,
            spice_port: None,
            timings,
        })
    }

    fn plan(&self, spec: &VmSpec, _image: Option<&ImageSpec>) -> Result<Plan> {
        let name = spec.name.as_str();
        let hash = self.spec_hash(spec);
        let mut plan = Plan {
            name: name.to_string(),
            backend: self.name.clone(),
            ..Plan::default()
        };
        let desired = self.desired_config(spec, &hash);
        let shown = |key: &str, value: &str| -> String {
            // Keys are long and the marker is multi-line: show what matters.
            match key {
                "sshkeys" => format!("{} key(s)", value.matches("%0A").count() + 1),
                "description" => value.lines().nth(1).unwrap_or_default().to_string(),
                _ => value.to_string(),
            }
        };
        match self.find(name)? {
            None => {
                plan.create = true;
                plan.changes.push(Change {
                    key: "clone".into(),
                    old: None,
                    new: format!(
                        "template {} ({} clone)",
                        match &self.spec.template {
                            TemplateRef::Id(id) => id.to_string(),
                            TemplateRef::Name(n) => n.clone(),
                        },
                        if self.spec.full_clone {
                            "full"
                        } else {
                            "linked"
                        }
                    ),
                });
                for (key, value) in &desired {
                    plan.changes.push(Change {
                        key: key.to_string(),
                        old: None,
                        new: shown(key, value),
                    });
                }
                plan.resize = spec.disk.map(|d| d.to_string());
                plan.start = true;
            }
            Some(found) => {
                for (key, value) in &desired {
                    let old = found.config[*key]
                        .as_str()
                        .map(String::from)
                        .or_else(|| found.config[*key].as_u64().map(|n| n.to_string()));
                    let same = match *key {
                        "sshkeys" => {
                            old.as_deref()
                                .map(|o| o.replace(' ', "%20").replace('\n', "%0A"))
                                .as_deref()
                                == Some(value.as_str())
                                || old.as_deref() == Some(value.as_str())
                        }
                        _ => old.as_deref() == Some(value.as_str()),
                    };
                    if !same {
                        plan.changes.push(Change {
                            key: key.to_string(),
                            old: old.as_deref().map(|o| shown(key, o)),
                            new: shown(key, value),
                        });
                    }
                }
                if let (Some(want), Some((_, have))) = (spec.disk, boot_disk(&found.config))
                    && want.bytes() > have
                {
                    plan.resize = Some(want.to_string());
                }
                plan.start = !found.running;
                plan.restart_needed = found.running && !plan.changes.is_empty();
            }
        }
        Ok(plan)
    }

    fn wait_ready(&self, name: &str, timeout: Duration) -> Result<Duration> {
        let (found, _) = self.managed(name)?;
        let start = Instant::now();
        // The agent answers 500 "not running" until the guest has booted it.
        loop {
            match self
                .client
                .post(&self.vm_path(found.vmid, "/agent/ping"), &[])
            {
                Ok(_) => break,
                Err(PveError::Api { message, .. })
                    if start.elapsed() < timeout && message.contains("not running") =>
                {
                    std::thread::sleep(POLL);
                }
                Err(e) => return Err(anyhow!("{name}: the guest agent did not answer: {e}").into()),
            }
        }
        let ip = loop {
            match self.guest_ip(found.vmid) {
                Ok(Some(ip)) => break ip,
                Ok(None) | Err(_) if start.elapsed() < timeout => std::thread::sleep(POLL),
                Ok(None) => {
                    return Err(anyhow!("{name}: the guest reports no routable address").into());
                }
                Err(e) => return Err(pve(e)),
            }
        };
        let addr = SocketAddr::new(ip, self.spec.ssh_port);
        while crate::ssh::read_banner(&addr).is_none() {
            if start.elapsed() >= timeout {
                return Err(anyhow!(
                    "{name}: no SSH banner on {addr} after {}s",
                    timeout.as_secs()
                )
                .into());
            }
            std::thread::sleep(POLL);
        }
        Ok(start.elapsed())
    }

    fn down(&self, name: &str, force: bool, timeout: Duration) -> Result<DownPath> {
        let (found, _) = self.managed(name)?;
        if !found.running {
            return Ok(DownPath::AlreadyStopped);
        }
        let silent = crate::progress::Silent;
        if !force {
            let upid = self
                .client
                .post(
                    &self.vm_path(found.vmid, "/status/shutdown"),
                    &[("timeout", timeout.as_secs().to_string())],
                )
                .map_err(pve)?;
            if self
                .client
                .wait_task(&upid, "shutdown", &silent, name)
                .is_ok()
            {
                return Ok(DownPath::Acpi);
            }
        }
        let upid = self
            .client
            .post(&self.vm_path(found.vmid, "/status/stop"), &[])
            .map_err(pve)?;
        self.client.wait_task(&upid, "stop", &silent, name)?;
        Ok(DownPath::Forced)
    }

    fn destroy(&self, name: &str) -> Result<()> {
        let (found, _) = self.managed(name)?;
        let silent = crate::progress::Silent;
        if found.running {
            let upid = self
                .client
                .post(&self.vm_path(found.vmid, "/status/stop"), &[])
                .map_err(pve)?;
            self.client.wait_task(&upid, "stop", &silent, name)?;
        }
        self.purge(found.vmid, &silent, name)?;
        let _ = std::fs::remove_dir_all(self.known_hosts_dir(name));
        Ok(())
    }

    fn status(&self, name: &str, spec: Option<&VmSpec>) -> Result<VmStatus> {
        match self.find(name)? {
            Some(found) => {
                let mut status = self.status_of(name, &found, spec);
                if found.running {
                    match self.guest_ip(found.vmid) {
                        Ok(ip) => {
                            status.agent = "ready".into();
                            status.ips = ip.map(|i| i.to_string()).into_iter().collect();
                        }
                        Err(_) => status.agent = "not-responding".into(),
                    }
                }
                Ok(status)
            }
            None => Ok(VmStatus {
                name: name.to_string(),
                state: State::Absent,
                backend: self.name.clone(),
                ssh_port: None,
                spice_port: None,
                image: None,
                readonly: spec.is_some_and(|s| s.readonly),
                restart_needed: false,
                in_spec: spec.is_some(),
                purpose: spec.and_then(|s| s.purpose.clone()),
                ips: Vec::new(),
                agent: "stopped".into(),
            }),
        }
    }

    fn list(&self) -> Result<Vec<VmStatus>> {
        let mut out = Vec::new();
        for r in self.resources()? {
            let in_pool = self.spec.pool.as_deref().is_some_and(|p| r["pool"] == p);
            if r["template"] == 1 || r["node"] != self.spec.node.as_str() {
                continue;
            }
            let Some(name) = r["name"].as_str() else {
                continue;
            };
            // The resource list is already in hand: only the config is fetched.
            let found = self.found(&r)?;
            if found.marker.is_some() || in_pool {
                out.push(self.status_of(name, &found, None));
            }
        }
        Ok(out)
    }

    fn ssh_endpoint(&self, name: &str) -> Result<Endpoint> {
        let (found, marker) = self.managed(name)?;
        let ip = self
            .guest_ip(found.vmid)
            .map_err(pve)?
            .ok_or_else(|| anyhow!("{name}: the guest reports no address (is it running?)"))?;
        let dir = self.known_hosts_dir(name);
        crate::fsutil::create_private_dir(&dir)?;
        Ok(Endpoint {
            vm: name.to_string(),
            host: ip.to_string(),
            port: self.spec.ssh_port,
            user: marker.user,
            identity: self.identity.private_key.clone(),
            known_hosts: dir.join(crate::paths::VM_KNOWN_HOSTS_FILE),
            strict: false,
        })
    }
}

/// What `agentvm proxmox bootstrap-user` made.
#[derive(Debug, serde::Serialize)]
pub struct Bootstrapped {
    pub user: String,
    pub pool: String,
    pub token_id: String,
    /// The secret, shown once: Proxmox does not show it again.
    pub token: String,
}

impl ProxmoxBackend {
    /// With this backend's (admin) token: a user, a pool `pool-USER`, the
    /// `PVEVMAdmin` role on that pool for the user and its new API token, and
    /// the token itself. VMs are then made with the user's token, not the admin's.
    pub fn bootstrap_user(&self, user: &str) -> anyhow::Result<Bootstrapped> {
        let userid = if user.contains('@') {
            user.to_string()
        } else {
            format!("{user}@pve")
        };
        let short = userid.split('@').next().unwrap_or(user).to_string();
        let pool = format!("pool-{short}");
        let tokenid = "agentvm";
        let api = |e: PveError| anyhow!(e);
        self.client
            .post(
                "/access/users",
                &[
                    ("userid", userid.clone()),
                    ("comment", "agentvm user".into()),
                ],
            )
            .map_err(api)?;
        self.client
            .post(
                "/pools",
                &[
                    ("poolid", pool.clone()),
                    ("comment", format!("agentvm VMs of {userid}")),
                ],
            )
            .map_err(api)?;
        let created = self
            .client
            .post(
                &format!("/access/users/{userid}/token/{tokenid}"),
                &[("privsep", "1".into()), ("comment", "agentvm".into())],
            )
            .map_err(api)?;
        let full = created["full-tokenid"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| format!("{userid}!{tokenid}"));
        let secret = created["value"]
            .as_str()
            .context("the new token has no value")?
            .to_string();
        self.client
            .put(
                "/access/acl",
                &[
                    ("path", format!("/pool/{pool}")),
                    ("roles", "PVEVMAdmin".into()),
                    ("users", userid.clone()),
                    ("tokens", full.clone()),
                    ("propagate", "1".into()),
                ],
            )
            .map_err(api)?;
        Ok(Bootstrapped {
            user: userid,
            pool,
            token: format!("{full}={secret}"),
            token_id: full,
        })
    }

    fn known_hosts_dir(&self, name: &str) -> PathBuf {
        self.home
            .root()
            .join(crate::paths::REMOTE_DIR)
            .join(&self.name)
            .join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips() {
        let m = Marker {
            spec_hash: "sha256:ab".into(),
            readonly: true,
            user: "agent".into(),
        };
        let text = m.render(Some("builds"));
        assert!(text.starts_with("agentvm: managed\n"));
        assert_eq!(Marker::parse(&text), Some(m));
        assert_eq!(Marker::parse("my own VM"), None);
    }

    #[test]
    fn finds_the_boot_disk_and_its_size() {
        let config = serde_json::json!({
            "ide2": "local-lvm:vm-100-cloudinit,media=cdrom",
            "scsi0": "local-lvm:base-9000-disk-0/vm-100-disk-0,size=8G",
        });
        assert_eq!(boot_disk(&config), Some(("scsi0".into(), 8 * GIB)));
        assert_eq!(parse_pve_size("512M"), Some(512 * 1024 * 1024));
        assert_eq!(parse_pve_size("1.5G"), Some(GIB + GIB / 2));
    }
}
