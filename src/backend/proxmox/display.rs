//! Snapshots (`/qemu/{vmid}/snapshot…`, with the memory when the VM runs) and
//! consoles on Proxmox: SPICE through the node's `spiceproxy` as a
//! `remote-viewer` file; the serial console and screenshots are the web UI's.

use anyhow::anyhow;
use serde_json::Value;

use super::{Found, ProxmoxBackend, pve};
use crate::backend::{
    Display, Forwards, Lifecycle, Result, SnapshotAction, SnapshotInfo, Snapshots, SpiceAccess,
};
use crate::fsutil::write_atomic;
use crate::progress::Silent;

/// The `remote-viewer` connection file written for `agentvm spice`.
pub const SPICE_FILE: &str = "spice.vv";

/// PVE's snapshot names (`pve-configid`): a letter, then letters, digits, `_`
/// and `-`; at most 40 characters.
fn valid_snapshot_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() >= 2
        && name.len() <= 40
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl ProxmoxBackend {
    /// The web UI's console of a VM (noVNC), for what only the web UI offers.
    pub(super) fn web_console(&self, name: &str) -> String {
        match self.managed(name) {
            Ok((found, _)) => format!(
                "{}/?console=kvm&novnc=1&vmid={}&vmname={name}&node={}&resize=off&cmd=",
                self.spec.endpoint, found.vmid, found.node
            ),
            Err(_) => format!("{}/ (VM {name})", self.spec.endpoint),
        }
    }

    fn snapshot_list(&self, found: &Found) -> Result<Vec<SnapshotInfo>> {
        let list = self
            .client
            .get(&Self::path_of(found, "/snapshot"), &[])
            .map_err(pve)?;
        let mut out: Vec<SnapshotInfo> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] != "current")
            .filter_map(|s| {
                Some(SnapshotInfo {
                    name: s["name"].as_str()?.to_string(),
                    created: s["snaptime"].as_u64().unwrap_or(0),
                    state: if super::exec::truthy(&s["vmstate"]) {
                        "running"
                    } else {
                        "shutoff"
                    }
                    .to_string(),
                })
            })
            .collect();
        out.sort_by_key(|s| s.created);
        Ok(out)
    }

    fn require_snapshot(&self, found: &Found, vm: &str, snap: &str) -> Result<()> {
        if self.snapshot_list(found)?.iter().any(|s| s.name == snap) {
            Ok(())
        } else {
            Err(anyhow!("{vm}: no snapshot {snap} (agentvm snapshot {vm} list)").into())
        }
    }
}

impl Snapshots for ProxmoxBackend {
    fn snapshot(&self, name: &str, action: &SnapshotAction) -> Result<Vec<SnapshotInfo>> {
        let (found, _) = self.managed(name)?;
        let task = match action {
            SnapshotAction::List => None,
            SnapshotAction::Create { name: snap } => {
                let snap = snap
                    .clone()
                    .unwrap_or_else(crate::backend::default_snapshot_name);
                if !valid_snapshot_name(&snap) {
                    return Err(anyhow!(
                        "snapshot name {snap:?}: Proxmox takes 2 to 40 letters, digits, '_' and '-', starting with a letter"
                    )
                    .into());
                }
                let mut params = vec![
                    ("snapname", snap.clone()),
                    ("description", format!("agentvm snapshot of {name}")),
                ];
                if found.running {
                    params.push(("vmstate", "1".into()));
                }
                let upid = self
                    .client
                    .post(&Self::path_of(&found, "/snapshot"), &params)
                    .map_err(pve)?;
                Some((upid, format!("snapshot {snap}")))
            }
            SnapshotAction::Revert { name: snap } => {
                self.require_snapshot(&found, name, snap)?;
                let upid = self
                    .client
                    .post(
                        &Self::path_of(&found, &format!("/snapshot/{snap}/rollback")),
                        &[],
                    )
                    .map_err(pve)?;
                Some((upid, format!("rollback to {snap}")))
            }
            SnapshotAction::Delete { name: snap } => {
                self.require_snapshot(&found, name, snap)?;
                let upid = self
                    .client
                    .delete(&Self::path_of(&found, &format!("/snapshot/{snap}")), &[])
                    .map_err(pve)?;
                Some((upid, format!("delete snapshot {snap}")))
            }
        };
        if let Some((upid, what)) = task {
            self.client.wait_task(&upid, &what, &Silent, name)?;
        }
        self.snapshot_list(&found)
    }
}

/// Proxmox VMs are reached on their own address: the default refusal says so.
impl Forwards for ProxmoxBackend {}

impl crate::backend::Shares for ProxmoxBackend {}

impl crate::backend::Forks for ProxmoxBackend {}

impl Display for ProxmoxBackend {
    fn serial_log(&self, name: &str) -> Result<std::path::PathBuf> {
        Err(self.unsupported(
            "a serial console log",
            &format!("open the web console: {}", self.web_console(name)),
        ))
    }

    fn screenshot(&self, name: &str, _png: &std::path::Path) -> Result<(u32, u32)> {
        Err(self.unsupported(
            "screenshots",
            &format!("open the web console: {}", self.web_console(name)),
        ))
    }

    fn spice(&self, name: &str) -> Result<SpiceAccess> {
        let (found, _) = self.managed(name)?;
        if !found.running {
            return Err(anyhow!("{name} is not running (agentvm up {name})").into());
        }
        let vga = found.config["vga"].as_str().unwrap_or("default");
        if !(vga.starts_with("qxl") || vga.starts_with("virtio")) {
            return Err(anyhow!(
                "{name} has no SPICE display (vga: {vga}): set Hardware → Display to SPICE in the web UI \
                 (or `qm set {} --vga qxl` on node {}), then restart it with agentvm down/up",
                found.vmid,
                found.node
            )
            .into());
        }
        let proxy = reqwest::Url::parse(&self.spec.endpoint)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string));
        let params: Vec<(&str, String)> = proxy.into_iter().map(|p| ("proxy", p)).collect();
        let ticket = self
            .client
            .post(&Self::path_of(&found, "/spiceproxy"), &params)
            .map_err(pve)?;
        let dir = self.known_hosts_dir(name);
        crate::fsutil::create_private_dir(&dir)?;
        let file = dir.join(SPICE_FILE);
        write_atomic(&file, viewer_file(&ticket)?.as_bytes(), 0o600)?;
        Ok(SpiceAccess {
            uri: None,
            viewer_file: Some(file),
        })
    }
}

/// The `[virt-viewer]` file `remote-viewer` opens, from `spiceproxy`'s answer
/// (every key as PVE gives it; newlines in values, as in `ca`, escaped).
fn viewer_file(ticket: &Value) -> anyhow::Result<String> {
    let object = ticket
        .as_object()
        .ok_or_else(|| anyhow!("spiceproxy answered {ticket} instead of connection settings"))?;
    if !object.contains_key("password") || !object.contains_key("host") {
        return Err(anyhow!("spiceproxy's answer has no host or password"));
    }
    let mut out = String::from("[virt-viewer]\n");
    for (key, value) in object {
        let text = match value {
            Value::String(s) => s.replace('\n', "\\n"),
            Value::Null => continue,
            other => other.to_string(),
        };
        out.push_str(&format!("{key}={text}\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_follow_pve_configid() {
        assert!(valid_snapshot_name("snap-20261203T040000Z"));
        assert!(valid_snapshot_name("before_upgrade"));
        assert!(!valid_snapshot_name("1st"));
        assert!(!valid_snapshot_name("a.b"));
        assert!(!valid_snapshot_name(&"a".repeat(41)));
    }

    #[test]
    fn the_viewer_file_has_every_key_and_escaped_newlines() {
        let text = viewer_file(&serde_json::json!({
            "type": "spice", "host": "pvespiceproxy:1:100:pve::abc", "password": "s3cret",
            "proxy": "http://pve.lan:3128", "tls-port": 61000, "ca": "-----BEGIN\nX\n-----END",
        }))
        .unwrap();
        assert!(text.starts_with("[virt-viewer]\n"));
        assert!(text.contains("tls-port=61000\n"));
        assert!(text.contains("ca=-----BEGIN\\nX\\n-----END\n"));
        assert!(viewer_file(&serde_json::json!({"type": "spice"})).is_err());
    }
}
