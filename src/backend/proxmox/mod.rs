//! The Proxmox VE backend: the same `[vms.NAME]` spec, cloned from a template
//! onto a node of a Proxmox cluster through its API with a token. VMs are found
//! cluster-wide and every call goes to the node a VM is on now. Split by role:
//! `client` (HTTP, tasks, uploads), `upid` (task ids), `privileges` (what each call needs, for 403s),
//! `marker` (the state kept in the VM's and a pushed template's description),
//! `create` (clone and configure), `lifecycle` (the orchestration's steps,
//! status and list), `offline` (VMs of offline nodes), `agent` (readiness, host
//! key, env delivery through the guest agent), `exec` (commands through the
//! agent), `display` (snapshots, SPICE, the web console), `bootstrap` (setting a
//! node up for agentvm), `template` (templates from agentvm images, and which
//! template a VM is cloned from), `storage` (a node's storages and which holds what).

mod agent;
mod bootstrap;
mod client;
mod create;
mod display;
mod exec;
mod lifecycle;
mod marker;
mod offline;
pub mod privileges;
mod storage;
mod template;
mod tls;
mod upid;

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
pub use marker::{MARKER, Marker, TEMPLATE_MARKER, TemplateMarker};

/// How often waits on the node poll.
const POLL: std::time::Duration = std::time::Duration::from_millis(500);
/// The most one guest agent may cost `list` or `status` (a hanging agent never
/// holds up the whole list).
const AGENT_QUICK: std::time::Duration = std::time::Duration::from_secs(2);
/// The most one agent call may take while `up` waits (a hung agent must not
/// outlast `--timeout`).
const AGENT_CALL: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the next call may take before `deadline`: at most [`AGENT_CALL`], at least 1 s.
fn call_limit(deadline: std::time::Instant) -> std::time::Duration {
    deadline
        .saturating_duration_since(std::time::Instant::now())
        .clamp(std::time::Duration::from_secs(1), AGENT_CALL)
}
/// `node = "auto"`: place new VMs on the online node with the most free memory.
pub const AUTO_NODE: &str = "auto";

/// A VM on the cluster, as agentvm sees it.
#[derive(Debug, Clone)]
struct Found {
    vmid: u32,
    /// The node it is on now (it may have been migrated).
    node: String,
    running: bool,
    marker: Option<Marker>,
    config: Value,
}

/// A cluster node from `/cluster/resources`.
#[derive(Debug, Clone)]
struct NodeInfo {
    name: String,
    online: bool,
    free_memory: u64,
}

pub struct ProxmoxBackend {
    name: String,
    spec: ProxmoxSpec,
    client: Client,
    home: Home,
    identity: Identity,
    /// Env deliveries through the guest agent, by VM name.
    deliveries: agent::Deliveries,
    /// One writer of the remembered VMIDs at a time.
    vmids_lock: std::sync::Mutex<()>,
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
            deliveries: agent::Deliveries::default(),
            vmids_lock: std::sync::Mutex::default(),
        })
    }

    fn vm_path(node: &str, vmid: u32, rest: &str) -> String {
        format!("/nodes/{node}/qemu/{vmid}{rest}")
    }

    /// `/nodes/{node}/qemu/{vmid}{rest}` for a VM where it is now.
    fn path_of(found: &Found, rest: &str) -> String {
        Self::vm_path(&found.node, found.vmid, rest)
    }

    /// Every VM on the cluster: (vmid, name, node, template, pool, status).
    fn resources(&self) -> Result<Vec<Value>> {
        self.cluster_resources("vm")
    }

    fn cluster_resources(&self, kind: &str) -> Result<Vec<Value>> {
        let list = self
            .client
            .get("/cluster/resources", &[("type", kind.into())])
            .map_err(pve)?;
        match list {
            Value::Array(items) => Ok(items),
            other => Err(anyhow!("/cluster/resources answered {other} instead of a list").into()),
        }
    }

    /// The cluster's nodes.
    fn nodes(&self) -> Result<Vec<NodeInfo>> {
        Ok(self
            .cluster_resources("node")?
            .iter()
            .filter(|r| r["type"] == "node")
            .filter_map(|r| {
                let name = r["node"].as_str()?.to_string();
                let max = r["maxmem"].as_u64().unwrap_or(0);
                let used = r["mem"].as_u64().unwrap_or(0);
                Some(NodeInfo {
                    name,
                    online: r["status"] == "online",
                    free_memory: max.saturating_sub(used),
                })
            })
            .collect())
    }

    /// The node new VMs go to: the configured one (which must exist and be
    /// online), or with `node = "auto"` the online node with the most free memory.
    fn placement_node(&self) -> Result<String> {
        let nodes = self.nodes()?;
        let names = || {
            nodes
                .iter()
                .map(|n| {
                    format!(
                        "{} ({})",
                        n.name,
                        if n.online { "online" } else { "offline" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.spec.node == AUTO_NODE {
            return nodes
                .iter()
                .filter(|n| n.online)
                .max_by_key(|n| n.free_memory)
                .map(|n| n.name.clone())
                .ok_or_else(|| {
                    anyhow!(
                        "backends.{}.node = \"auto\": no node of the cluster is online (nodes: {})",
                        self.name,
                        names()
                    )
                    .into()
                });
        }
        match nodes.iter().find(|n| n.name == self.spec.node) {
            Some(n) if n.online => Ok(n.name.clone()),
            Some(n) => Err(anyhow!(
                "backends.{}.node: node {} is offline; bring it back or set node = \"auto\"",
                self.name,
                n.name
            )
            .into()),
            None => Err(anyhow!(
                "backends.{}.node: the cluster has no node {:?} (nodes: {})",
                self.name,
                self.spec.node,
                names()
            )
            .into()),
        }
    }

    /// The VM `name` wherever it is in the cluster (templates left out).
    fn lookup(&self, name: &str) -> Result<Option<Found>> {
        let resources = self.resources()?;
        match resources
            .iter()
            .find(|r| r["name"] == name && r["template"] != 1)
        {
            Some(resource) => Ok(Some(self.found(resource)?)),
            None => {
                self.check_unreachable(name, &resources)?;
                Ok(None)
            }
        }
    }

    /// A VM from its `/cluster/resources` entry, with its config and marker.
    fn found(&self, resource: &Value) -> Result<Found> {
        let vmid = resource["vmid"].as_u64().context("resource without vmid")? as u32;
        let node = resource["node"]
            .as_str()
            .context("resource without node")?
            .to_string();
        if resource["status"] == "unknown" {
            return Err(anyhow!(
                "{} (vmid {vmid}) is on node {node}, which is offline: bring the node back, or migrate the VM",
                resource["name"].as_str().unwrap_or("the VM")
            )
            .into());
        }
        let config = self
            .client
            .get(&Self::vm_path(&node, vmid, "/config"), &[])
            .map_err(pve)?;
        let marker = config["description"].as_str().and_then(Marker::parse);
        if marker.is_some()
            && let Some(name) = resource["name"].as_str()
        {
            self.remember(vmid, name);
        }
        Ok(Found {
            vmid,
            node,
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

    /// The template the backend's `template` setting names: its VMID and the node it is on.
    fn configured_template(&self, wanted: &TemplateRef) -> Result<(u32, String)> {
        let resources = self.resources()?;
        let templates = || {
            resources
                .iter()
                .filter(|r| r["template"] == 1)
                .map(|r| format!("{} ({})", r["vmid"], r["name"].as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let entry = match wanted {
            TemplateRef::Id(id) => resources
                .iter()
                .find(|r| r["vmid"].as_u64() == Some(u64::from(*id))),
            TemplateRef::Name(name) => resources
                .iter()
                .find(|r| r["name"] == name.as_str() && r["template"] == 1),
        };
        let Some(entry) = entry else {
            let wanted = match wanted {
                TemplateRef::Id(id) => format!("vmid {id}"),
                TemplateRef::Name(n) => format!("{n:?}"),
            };
            return Err(anyhow!(
                "backends.{}.template: no template {wanted} in the cluster (templates: {})",
                self.name,
                match templates() {
                    t if t.is_empty() => "none".to_string(),
                    t => t,
                }
            )
            .into());
        };
        if entry["template"] != 1 {
            return Err(anyhow!(
                "backends.{}.template: vmid {} ({}) is a VM, not a template (convert it in the web UI: More → Convert to template)",
                self.name,
                entry["vmid"],
                entry["name"].as_str().unwrap_or("?")
            )
            .into());
        }
        let vmid = entry["vmid"].as_u64().context("template without vmid")? as u32;
        let node = entry["node"]
            .as_str()
            .context("template without node")?
            .to_string();
        Ok((vmid, node))
    }

    /// The guest's routable addresses from its agent, IPv4 first.
    /// Each call takes at most `limit` and is not repeated.
    fn guest_ips(
        &self,
        found: &Found,
        limit: std::time::Duration,
    ) -> std::result::Result<Vec<IpAddr>, PveError> {
        let path = Self::path_of(found, "/agent/network-get-interfaces");
        let reply = self.client.get_quick(&path, &[], limit)?;
        Ok(routable(&reply))
    }

    fn status_of(&self, name: &str, found: &Found, spec: Option<&VmSpec>) -> VmStatus {
        let readonly = spec.map_or(found.marker.as_ref().is_some_and(|m| m.readonly), |s| {
            s.readonly
        });
        let restart_needed = match (spec, &found.marker) {
            (Some(spec), Some(marker)) if found.running => {
                self.hash_with(spec, marker.host_key.as_deref()) != marker.spec_hash
            }
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
            image: spec.and_then(|s| s.image.as_ref()).map(ToString::to_string),
            readonly,
            restart_needed,
            in_spec: spec.is_some(),
            purpose: spec.and_then(|s| s.purpose.clone()),
            ips: Vec::new(),
            agent: if !found.running {
                AgentState::Stopped
            } else if agent_enabled(&found.config) {
                AgentState::NotResponding
            } else {
                AgentState::Disabled
            },
            env: spec.map(super::env_names).unwrap_or_default(),
            env_delivery: None,
            node: Some(found.node.clone()),
            forwards: Vec::new(),
            shares: Vec::new(),
            egress: crate::spec::Egress::Open,
            egress_tunnel: None,
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

/// What a failed agent call says to the user: PVE's answer, or, when agentvm
/// stopped waiting, that the agent did not answer in time.
fn agent_answer(e: &PveError) -> String {
    match e {
        PveError::Transport { message, .. } if message.contains("timed out") => {
            "no answer in time: the guest agent hangs, or the guest is too busy to answer".into()
        }
        other => other.to_string(),
    }
}

/// Whether a VM config has the guest agent on (`agent: 1` or `enabled=1,…`).
fn agent_enabled(config: &Value) -> bool {
    let text = match &config["agent"] {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return false,
    };
    let first = text.split(',').next().unwrap_or_default();
    matches!(
        first.trim_start_matches("enabled="),
        "1" | "yes" | "on" | "true"
    )
}

/// The routable addresses of an `agent/network-get-interfaces` reply, IPv4 first.
fn routable(reply: &Value) -> Vec<IpAddr> {
    let interfaces = reply["result"].as_array().cloned().unwrap_or_default();
    let mut ips: Vec<IpAddr> = interfaces
        .iter()
        .flat_map(|i| i["ip-addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| {
            a["ip-address"]
                .as_str()
                .and_then(|s| s.parse::<IpAddr>().ok())
        })
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
            IpAddr::V6(v6) => {
                !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified()
            }
        })
        .collect();
    ips.sort_by_key(|ip| ip.is_ipv6());
    ips.dedup();
    ips
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
