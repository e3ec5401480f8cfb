//! The Proxmox VE backend: the same `[vms.NAME]` spec, cloned from a template on
//! a Proxmox node through its API with a token. Split by role: `client` (HTTP,
//! tasks), `marker` (the state kept in the VM's description), `create` (clone
//! and configure), `lifecycle` (the orchestration's steps), `agent` (guest agent
//! and the capabilities it lacks), `bootstrap` (setting a node up for agentvm).

mod agent;
mod bootstrap;
mod client;
mod create;
mod lifecycle;
mod marker;
mod tls;

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, anyhow};
use serde_json::Value;

use super::{AgentState, BackendError, Result, State, VmStatus};
use crate::paths::Home;
use crate::spec::{GIB, ProxmoxSpec, TemplateRef, VmSpec};
use crate::ssh::Identity;
pub use bootstrap::{Bootstrapped, bootstrap_user};
pub use client::{Client, PveError, encode_ssh_keys, read_token};
pub use marker::{MARKER, Marker};

/// How often waits on the node poll.
const POLL: std::time::Duration = std::time::Duration::from_millis(500);

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
    pub fn connect(
        name: &str,
        spec: &ProxmoxSpec,
        token: &str,
        home: Home,
    ) -> anyhow::Result<Self> {
        home.ensure()?;
        Ok(Self {
            name: name.to_string(),
            client: Client::new(name, spec, token)?,
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
        match list {
            Value::Array(items) => Ok(items),
            other => Err(anyhow!("/cluster/resources answered {other} instead of a list").into()),
        }
    }

    fn lookup(&self, name: &str) -> Result<Option<Found>> {
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
            .lookup(name)?
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
        let canonical =
            serde_json::to_vec(&(spec.machine(), &self.spec)).expect("specs serialize to JSON");
        format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&canonical))
        )
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
                AgentState::NotResponding
            } else {
                AgentState::Stopped
            },
            // This backend does not deliver env yet, so it has none to show.
            env: Vec::new(),
        }
    }

    fn known_hosts_dir(&self, name: &str) -> PathBuf {
        self.home
            .root()
            .join(crate::paths::REMOTE_DIR)
            .join(&self.name)
            .join(name)
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

#[cfg(test)]
mod tests {
    use super::*;

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
