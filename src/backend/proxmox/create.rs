//! Making a Proxmox VM: clone the template (linked unless `full_clone`), set
//! its config (name, cores, memory, marker, cloud-init, agent), grow its disk.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use serde_json::Value;

use super::{Found, Marker, ProxmoxBackend, PveError, boot_disk, encode_ssh_keys, pve};
use crate::backend::Result;
use crate::progress::Reporter;
use crate::spec::VmSpec;

/// Attempts at a fresh VMID when another client takes ours in between.
const NEXTID_ATTEMPTS: u32 = 5;
/// How long a clone of unknown outcome may stay locked before agentvm gives up on it.
const CLONE_SETTLE: Duration = Duration::from_secs(600);

/// What a clone request whose reply was lost left behind.
enum CloneFate {
    /// The new VMID holds our VM.
    Ours,
    /// Another VM took the VMID.
    Taken,
    /// Nothing was made.
    Nothing,
}

impl ProxmoxBackend {
    /// Clones the template into a new VM on the placement node (`target` when
    /// the template is on another node): the pinned VMID, or `/cluster/nextid`
    /// again whenever another client took the id between asking and cloning.
    /// Returns the new VMID and its node.
    pub(super) fn clone_vm(
        &self,
        spec: &VmSpec,
        template: (u32, &str),
        progress: &dyn Reporter,
    ) -> Result<(u32, String)> {
        let name = spec.name.as_str();
        let (template, template_node) = template;
        let node = self.placement_node()?;
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
            if node != template_node {
                params.push(("target", node.clone()));
            }
            if let (Some(storage), true) = (&self.spec.storage, self.spec.full_clone) {
                params.push(("storage", storage.clone()));
            }
            progress.step(
                name,
                &format!("cloning template {template} to vmid {vmid} on node {node}"),
            );
            // Not sent again blindly: a clone whose reply was lost may have been made.
            match self
                .client
                .post_once(&Self::vm_path(template_node, template, "/clone"), &params)
            {
                Ok(upid) => {
                    if let Err(e) = self.client.wait_task(&upid, "clone", progress, name) {
                        // The clone started: do not leave half a VM behind.
                        return Err(match self.purge(&node, vmid, progress, name) {
                            Ok(()) => e.into(),
                            Err(cleanup) => anyhow!(
                                "{e:#}; removing the half-made clone (vmid {vmid}) failed too: {cleanup:#}"
                            )
                            .into(),
                        });
                    }
                    return Ok((vmid, node));
                }
                Err(e) if e.outcome_unknown() => {
                    progress.step(
                        name,
                        &format!("the clone request failed ({e}); looking whether vmid {vmid} was made anyway"),
                    );
                    match self.clone_fate(vmid, &node, name)? {
                        CloneFate::Ours => return Ok((vmid, node)),
                        CloneFate::Nothing if attempt < NEXTID_ATTEMPTS => {}
                        CloneFate::Taken if spec.vmid.is_none() && attempt < NEXTID_ATTEMPTS => {}
                        CloneFate::Nothing => return Err(pve(e)),
                        CloneFate::Taken => {
                            return Err(anyhow!(
                                "vmid {vmid} was taken by another VM while cloning {name} failed: {e}"
                            )
                            .into());
                        }
                    }
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

    /// After a clone whose outcome is unknown: whether `vmid` now is our new VM
    /// (waiting while PVE still holds it locked for the clone), another VM, or nothing.
    fn clone_fate(&self, vmid: u32, node: &str, name: &str) -> Result<CloneFate> {
        let deadline = Instant::now() + CLONE_SETTLE;
        loop {
            let entry = self
                .resources()?
                .into_iter()
                .find(|r| r["vmid"].as_u64() == Some(u64::from(vmid)));
            let Some(entry) = entry else {
                return Ok(CloneFate::Nothing);
            };
            if entry["lock"] == "clone" {
                if Instant::now() >= deadline {
                    return Err(anyhow!(
                        "vmid {vmid} is still locked for a clone after {}s: look at the node's tasks, then `agentvm up {name}` again",
                        CLONE_SETTLE.as_secs()
                    )
                    .into());
                }
                std::thread::sleep(super::POLL);
                continue;
            }
            let ours = entry["name"] == name && entry["node"] == node;
            return Ok(if ours {
                CloneFate::Ours
            } else {
                CloneFate::Taken
            });
        }
    }

    pub(super) fn purge(
        &self,
        node: &str,
        vmid: u32,
        progress: &dyn Reporter,
        name: &str,
    ) -> anyhow::Result<()> {
        let upid = self
            .client
            .delete(
                &Self::vm_path(node, vmid, ""),
                &[
                    ("purge", "1".into()),
                    ("destroy-unreferenced-disks", "1".into()),
                ],
            )
            .map_err(|e| anyhow!(e))?;
        self.client.wait_task(&upid, "delete", progress, name)
    }

    /// The config keys `up` sets: name, cores, memory, the marker, cloud-init
    /// (user, keys, DHCP) and the guest agent. Never the env's values.
    pub(super) fn desired_config(
        &self,
        spec: &VmSpec,
        hash: &str,
        host_key: Option<&str>,
    ) -> Vec<(&'static str, String)> {
        let marker = Marker {
            spec_hash: hash.to_string(),
            readonly: spec.readonly,
            user: spec.user.clone(),
            host_key: host_key.map(str::to_string),
            ssh_host: spec.ssh_host.clone(),
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

    pub(super) fn configure(
        &self,
        (node, vmid): (&str, u32),
        spec: &VmSpec,
        hash: &str,
        host_key: Option<&str>,
        progress: &dyn Reporter,
    ) -> Result<()> {
        let params = self.desired_config(spec, hash, host_key);
        let upid = self
            .client
            .post(&Self::vm_path(node, vmid, "/config"), &params)
            .map_err(pve)?;
        self.client
            .wait_task(&upid, "configure", progress, spec.name.as_str())
            .map_err(Into::into)
    }

    /// Grows the boot disk to the spec's size; never shrinks it.
    pub(super) fn grow_disk(
        &self,
        (node, vmid): (&str, u32),
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
                &Self::vm_path(node, vmid, "/resize"),
                &[("disk", disk.clone()), ("size", size)],
            )
            .map_err(pve)?;
        self.client
            .wait_task(&upid, "resize", progress, name)
            .map_err(Into::into)
    }

    pub(super) fn start_vm(
        &self,
        found: &Found,
        name: &str,
        progress: &dyn Reporter,
    ) -> Result<()> {
        let upid = self
            .client
            .post(&Self::path_of(found, "/status/start"), &[])
            .map_err(pve)?;
        self.client
            .wait_task(&upid, "start", progress, name)
            .map_err(Into::into)
    }
}
