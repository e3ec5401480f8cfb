//! The cluster-wide handlers of the fake PVE: the next free VMID, `/cluster/resources` and the
//! node list, as pve-manager builds them from the cluster's member and RRD data.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::model::{FakeNode, FakeStorage, FakeVm};
use super::qemu::{is_disk_key, size_gib, vmid_of};
use super::state::{Caller, Fail, Params, State, fail};

/// What every fake node reports of itself beside its memory.
const NODE_CPUS: u64 = 2;
const NODE_DISK: u64 = 64 << 30;

impl State {
    pub(super) fn nextid(&mut self, p: &Params) -> Result<Value, Fail> {
        if let Some(vmid) = p.get("vmid") {
            let vmid = vmid_of(vmid);
            if self.vms.contains_key(&vmid) {
                return fail(400, format!("VM {vmid} already exists"));
            }
            return Ok(json!(vmid.to_string()));
        }
        let id = (100..).find(|id| !self.vms.contains_key(id)).unwrap();
        if self.nextid_race_pending {
            self.nextid_race_pending = false;
            let mut config = BTreeMap::new();
            config.insert("name".to_string(), "someone-else".to_string());
            let vm = FakeVm {
                name: "someone-else".into(),
                node: self.opts.node.clone(),
                config,
                ..FakeVm::default()
            };
            self.vms.insert(id, vm);
        }
        // PVE declares an integer but sends the id as a JSON string.
        Ok(json!(id.to_string()))
    }

    fn node_online(&self, name: &str) -> bool {
        self.nodes.iter().any(|n| n.name == name && n.online)
    }

    /// `GET /cluster/resources`. A node offline for more than the five minutes pmxcfs keeps
    /// RRD data has no statistics left: the node shows only its status, its VMs only `status:
    /// unknown` (no name), its storages `status: unknown`.
    pub(super) fn resources(&self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        let kind = p.get("type").map(String::as_str);
        let mut out = Vec::new();
        if kind.is_none() || kind == Some("vm") {
            for (vmid, vm) in &self.vms {
                if !caller.has("VM.Audit") {
                    break;
                }
                let mut r = json!({
                    "id": format!("qemu/{vmid}"),
                    "type": "qemu",
                    "vmid": vmid,
                    "node": vm.node,
                    "status": "unknown",
                });
                if self.node_online(&vm.node) {
                    let stats = json!({
                        "name": vm.name,
                        "status": if vm.running { "running" } else { "stopped" },
                        "template": u8::from(vm.template),
                        "maxcpu": vm.cores(),
                        "cpu": if vm.running { 0.01 } else { 0.0 },
                        "maxmem": vm.memory_mib() << 20,
                        "mem": if vm.running { (vm.memory_mib() << 20) / 2 } else { 0 },
                        "maxdisk": vm.disk_size_gib << 30,
                        "disk": 0,
                        "uptime": if vm.running { 42 } else { 0 },
                        "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0,
                    });
                    for (k, v) in stats.as_object().unwrap() {
                        r[k] = v.clone();
                    }
                }
                if let Some(pool) = &vm.pool {
                    r["pool"] = json!(pool);
                }
                for key in ["lock", "tags"] {
                    if let Some(value) = vm.config.get(key) {
                        r[key] = json!(value);
                    }
                }
                out.push(r);
            }
        }
        if kind.is_none() || kind == Some("node") {
            for node in &self.nodes {
                out.push(self.node_json(caller, node));
            }
        }
        if kind.is_none() || kind == Some("storage") {
            for node in &self.nodes {
                for storage in &self.storages {
                    if !caller.has("Datastore.Audit") && !caller.has("Datastore.AllocateSpace") {
                        continue;
                    }
                    let mut r = json!({
                        "id": format!("storage/{}/{}", node.name, storage.name),
                        "type": "storage",
                        "node": node.name,
                        "storage": storage.name,
                        "plugintype": storage.kind,
                        "content": storage.content.join(","),
                        "shared": u8::from(storage.shared),
                        "status": "unknown",
                    });
                    if node.online {
                        let used = self.storage_used(&node.name, storage);
                        r["status"] = json!("available");
                        r["disk"] = json!(used);
                        r["maxdisk"] = json!(used + storage.avail);
                    }
                    out.push(r);
                }
            }
        }
        Ok(Value::Array(out))
    }

    /// `GET /nodes`: every node, with statistics when online and the caller has `Sys.Audit`.
    pub(super) fn list_nodes(&self, caller: &Caller) -> Result<Value, Fail> {
        let list = self
            .nodes
            .iter()
            .map(|node| {
                let mut r = self.node_json(caller, node);
                r["ssl_fingerprint"] = json!(fingerprint(&node.name));
                r
            })
            .collect();
        Ok(Value::Array(list))
    }

    /// A node as pve-manager's extract_node_stats gives it.
    fn node_json(&self, caller: &Caller, node: &FakeNode) -> Value {
        let mut r = json!({
            "id": format!("node/{}", node.name),
            "node": node.name,
            "type": "node",
            "status": if node.online { "online" } else { "offline" },
        });
        if node.online {
            r["level"] = json!("");
            r["cgroup-mode"] = json!(2);
            if caller.has("Sys.Audit") {
                let stats = json!({
                    "uptime": 86400, "cpu": 0.03, "maxcpu": NODE_CPUS,
                    "mem": node.mem, "maxmem": node.maxmem,
                    "disk": 8u64 << 30, "maxdisk": NODE_DISK,
                });
                for (k, v) in stats.as_object().unwrap() {
                    r[k] = v.clone();
                }
            }
        }
        r
    }

    /// Bytes a storage holds on a node: its volumes and the VM disks on it.
    pub(super) fn storage_used(&self, node: &str, storage: &FakeStorage) -> u64 {
        let key_node = if storage.shared { "" } else { node };
        let prefix = format!("{}:", storage.name);
        let volumes: u64 = self
            .volumes
            .iter()
            .filter(|((n, volid), _)| n == key_node && volid.starts_with(&prefix))
            .map(|(_, v)| v.data.len() as u64)
            .sum();
        let disks: f64 = self
            .vms
            .values()
            .filter(|vm| storage.shared || vm.node == node)
            .flat_map(|vm| vm.config.iter())
            .filter(|(k, v)| is_disk_key(k) && v.starts_with(&prefix))
            .filter_map(|(_, v)| {
                let size = regex::Regex::new(r"size=([0-9.]+[KMGT]?)").unwrap();
                size.captures(v).and_then(|c| size_gib(&c[1]))
            })
            .sum();
        volumes + (disks * (1u64 << 30) as f64) as u64
    }
}

/// A node certificate's SHA-256 fingerprint, stable per node name.
fn fingerprint(node: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(format!("fake-pve node certificate {node}").as_bytes())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}
