//! The local backend's snapshots: libvirt internal snapshots (disk, and
//! memory when running) in the VM's qcow2 overlay.

use anyhow::{Context, anyhow};
use serde::{Deserialize, Serialize};
use virt::domain::Domain;

use super::{LocalBackend, lv};
use crate::backend::{Result, SnapshotAction, SnapshotInfo, Snapshots};

impl Snapshots for LocalBackend {
    fn snapshot(&self, name: &str, action: &SnapshotAction) -> Result<Vec<SnapshotInfo>> {
        let (dom, state) = self.require(name)?;
        let dom = &dom;
        match action {
            SnapshotAction::Create { .. }
                if !state.shares.is_empty() && dom.is_active().map_err(lv)? =>
            {
                // QEMU cannot save a mounted share's device state with the
                // memory ("non-migratable device").
                return Err(anyhow!(
                    "{name}: a running VM with shared folders cannot be snapshotted with its memory \
                     (QEMU cannot save the share devices' state); stop it first \
                     (agentvm down {name}) and snapshot the stopped VM"
                )
                .into());
            }
            SnapshotAction::Create { name: snap } => {
                let snap = snap
                    .clone()
                    .unwrap_or_else(crate::backend::default_snapshot_name);
                crate::spec::Name::new(&snap).map_err(|e| anyhow!("snapshot name: {e}"))?;
                let xml = quick_xml::se::to_string(&NewSnapshot {
                    name: snap.clone(),
                    description: format!("agentvm snapshot of {name}"),
                })
                .context("writing snapshot XML")?;
                dom.create_snapshot_xml(&xml, 0)
                    .map_err(lv)
                    .with_context(|| format!("{name}: creating snapshot {snap}"))?;
            }
            SnapshotAction::Revert { name: snap } => find_snapshot(dom, name, snap)?
                .revert(0)
                .map_err(lv)
                .with_context(|| format!("{name}: reverting to {snap}"))?,
            SnapshotAction::Delete { name: snap } => find_snapshot(dom, name, snap)?
                .delete(0)
                .map_err(lv)
                .with_context(|| format!("{name}: deleting {snap}"))?,
            SnapshotAction::List => {}
        }
        let mut list = Vec::new();
        for snap in dom
            .list_all_snapshots(0)
            .map_err(lv)
            .context("listing snapshots")?
        {
            let xml = snap.xml_desc(0).map_err(lv).context("reading a snapshot")?;
            let info: SnapshotXml =
                quick_xml::de::from_str(&xml).context("reading snapshot XML")?;
            list.push(SnapshotInfo {
                name: info.name,
                created: info.creation_time,
                state: info.state,
            });
        }
        list.sort_by_key(|s| s.created);
        Ok(list)
    }
}

#[derive(Serialize)]
#[serde(rename = "domainsnapshot")]
struct NewSnapshot {
    name: String,
    description: String,
}

#[derive(Deserialize)]
struct SnapshotXml {
    name: String,
    #[serde(rename = "creationTime")]
    creation_time: u64,
    state: String,
}

fn find_snapshot(
    dom: &Domain,
    vm: &str,
    snap: &str,
) -> anyhow::Result<virt::domain_snapshot::DomainSnapshot> {
    Domain::lookup_snapshot_by_name(dom, snap, 0)
        .map_err(lv)
        .with_context(|| format!("{vm}: no snapshot {snap}"))
}
