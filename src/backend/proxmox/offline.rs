//! VMs on offline nodes. Proxmox lists them in `/cluster/resources` with
//! status `unknown` and without their name (it comes from the node's own
//! statistics), and their config cannot be read. agentvm remembers the name of
//! every VM it has seen by VMID (`remote/BACKEND/vmids.json`), so such a VM is
//! still shown, and a name that may belong to an unknown VM is never created twice.

use std::collections::BTreeMap;

use anyhow::anyhow;
use serde_json::Value;

use super::ProxmoxBackend;
use crate::backend::Result;
use crate::fsutil::{read_json_state, write_atomic};

/// A VM on an offline node: its VMID, node and the name agentvm knows for it.
pub(super) struct Unreachable {
    pub vmid: u32,
    pub node: String,
    pub name: Option<String>,
}

impl ProxmoxBackend {
    fn vmids_file(&self) -> std::path::PathBuf {
        self.home
            .root()
            .join(crate::paths::REMOTE_DIR)
            .join(&self.name)
            .join(crate::paths::REMOTE_VMIDS_FILE)
    }

    fn remembered(&self) -> BTreeMap<u32, String> {
        read_json_state(&self.vmids_file()).unwrap_or_else(|e| {
            tracing::warn!("{e:#}");
            BTreeMap::new()
        })
    }

    /// Records that `vmid` is agentvm's VM `name` (written only when it changes).
    pub(super) fn remember(&self, vmid: u32, name: &str) {
        let _guard = self.vmids_lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.vmids_file();
        // A file that does not parse is left as it is (read_json_state says so).
        let mut map: BTreeMap<u32, String> = match read_json_state(&path) {
            Ok(map) => map,
            Err(e) => {
                tracing::warn!("{e:#}");
                return;
            }
        };
        if map.get(&vmid).map(String::as_str) == Some(name) {
            return;
        }
        map.insert(vmid, name.to_string());
        let written = crate::fsutil::create_private_dir(path.parent().expect("a file in a folder"))
            .and_then(|()| {
                write_atomic(
                    &path,
                    &serde_json::to_vec_pretty(&map).unwrap_or_default(),
                    0o600,
                )
            });
        if let Err(e) = written {
            tracing::warn!("recording vmid {vmid} as {name}: {e:#}");
        }
    }

    /// The VMs of `resources` on offline nodes that may be agentvm's (in the
    /// backend's pool, when it has one), with the names agentvm remembers.
    pub(super) fn unreachable(&self, resources: &[Value]) -> Vec<Unreachable> {
        let names = self.remembered();
        resources
            .iter()
            .filter(|r| r["status"] == "unknown" && r["template"] != 1)
            .filter(|r| {
                self.spec
                    .pool
                    .as_deref()
                    .is_none_or(|pool| r["pool"].is_null() || r["pool"] == pool)
            })
            .filter_map(|r| {
                let vmid = r["vmid"].as_u64()? as u32;
                Some(Unreachable {
                    vmid,
                    node: r["node"].as_str().unwrap_or("?").to_string(),
                    name: r["name"]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| names.get(&vmid).cloned()),
                })
            })
            .collect()
    }

    /// For a name no online node has: an error when it is, or may be, a VM on
    /// an offline node (so `up` never makes it twice); `Ok` when it is nowhere.
    pub(super) fn check_unreachable(&self, name: &str, resources: &[Value]) -> Result<()> {
        for vm in self.unreachable(resources) {
            match vm.name.as_deref() {
                Some(known) if known == name => {
                    return Err(anyhow!(
                        "{name} (vmid {}) is on node {}, which is offline: bring the node back, or migrate the VM",
                        vm.vmid,
                        vm.node
                    )
                    .into());
                }
                Some(_) => {}
                None => {
                    return Err(anyhow!(
                        "{name} is on no online node, and node {} is offline with vmid {}, whose name Proxmox cannot tell: \
                         it may be {name}; bring the node back before making {name} anew",
                        vm.node,
                        vm.vmid
                    )
                    .into());
                }
            }
        }
        Ok(())
    }
}
