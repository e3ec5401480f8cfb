//! VM snapshots and templates in the fake PVE, as qemu-server (API2/Qemu.pm) and
//! pve-guest-common (AbstractConfig.pm) handle them. The guest's files are part of a snapshot:
//! a rollback restores them.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::model::FakeSnapshot;
use super::qemu::is_disk_key;
use super::state::{Caller, Fail, Params, State, fail};
use super::syntax::parse_bool;
use super::tasks::unix_now;

/// Config keys a snapshot does not copy (__snapshot_copy_config).
fn copied(key: &str) -> bool {
    let unused = key
        .strip_prefix("unused")
        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
    let meta = matches!(
        key,
        "snapshots" | "snapstate" | "snaptime" | "vmstate" | "lock" | "digest" | "description"
    );
    !meta && !unused
}

impl State {
    /// `GET …/snapshot`: every snapshot, then the `current` pseudo-entry.
    pub(super) fn list_snapshots(&self, caller: &Caller, vmid: u32) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.Audit")?;
        let vm = self.vm(vmid)?;
        let mut snaps: Vec<(&String, &FakeSnapshot)> = vm.snapshots.iter().collect();
        snaps.sort_by_key(|(name, s)| (s.snaptime, (*name).clone()));
        let mut list: Vec<Value> = snaps
            .into_iter()
            .map(|(name, s)| {
                let mut r = json!({
                    "name": name,
                    "snaptime": s.snaptime,
                    "vmstate": u8::from(s.vmstate),
                    "description": s.description.clone().unwrap_or_default(),
                });
                if let Some(parent) = &s.parent {
                    r["parent"] = json!(parent);
                }
                r
            })
            .collect();
        let mut current = json!({
            "name": "current",
            "digest": vm.digest(),
            "running": u8::from(vm.running),
            "description": "You are here!",
        });
        if let Some(parent) = vm.config.get("parent") {
            current["parent"] = json!(parent);
        }
        list.push(current);
        Ok(Value::Array(list))
    }

    /// `POST …/snapshot` (task `qmsnapshot`). `vmstate` saves RAM only while the VM runs.
    pub(super) fn create_snapshot(
        &mut self,
        caller: &Caller,
        vmid: u32,
        p: &Params,
    ) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.Snapshot")?;
        let snapname = p["snapname"].clone();
        if snapname == "current" || snapname.eq_ignore_ascii_case("pending") {
            return fail(
                500,
                format!(
                    "unable to use snapshot name '{}' (reserved name)",
                    snapname.to_lowercase()
                ),
            );
        }
        self.vm(vmid)?;
        let want_vmstate = p.get("vmstate").and_then(|v| parse_bool(v)) == Some(true);
        let description = p.get("description").filter(|d| !d.is_empty()).cloned();
        let upid = self.start_task("qmsnapshot", &vmid.to_string(), &caller.token, |st| {
            let storage = st.opts.storage.clone();
            let vm = st.vms.get_mut(&vmid).expect("checked above");
            if vm.template {
                return Err("you can't take a snapshot if it's a template".into());
            }
            if let Some(lock) = vm.config.get("lock") {
                return Err(format!("VM is locked ({lock})"));
            }
            if vm.snapshots.contains_key(&snapname) {
                return Err(format!("snapshot name '{snapname}' already used"));
            }
            let vmstate = want_vmstate && vm.running;
            let mut config: BTreeMap<String, String> = vm
                .config
                .iter()
                .filter(|(k, _)| copied(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if vmstate {
                config.insert(
                    "vmstate".into(),
                    format!("{storage}:vm-{vmid}-state-{snapname}"),
                );
            }
            let snap = FakeSnapshot {
                parent: vm.config.get("parent").cloned(),
                config,
                snaptime: unix_now(),
                vmstate,
                description,
            };
            vm.snapshots.insert(snapname.clone(), snap);
            vm.config.insert("parent".into(), snapname.clone());
            let fs = st.guest(vmid).fs.clone();
            st.guest(vmid).snapshots.insert(snapname.clone(), fs);
            Ok(vec![format!("snapshotting '{snapname}'")])
        });
        Ok(json!(upid))
    }

    /// `DELETE …/snapshot/{snapname}` (task `qmdelsnapshot`): children move to its parent.
    pub(super) fn delete_snapshot(
        &mut self,
        caller: &Caller,
        vmid: u32,
        snapname: &str,
        p: &Params,
    ) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.Snapshot")?;
        self.vm(vmid)?;
        let force = p.get("force").and_then(|v| parse_bool(v)) == Some(true);
        let snapname = snapname.to_string();
        let upid = self.start_task("qmdelsnapshot", &vmid.to_string(), &caller.token, |st| {
            let vm = st.vms.get_mut(&vmid).expect("checked above");
            if let Some(lock) = vm.config.get("lock")
                && !force
            {
                return Err(format!("VM is locked ({lock})"));
            }
            if vm.template {
                return Err("you can't delete a snapshot if vm is a template".into());
            }
            let snap = vm
                .snapshots
                .remove(&snapname)
                .ok_or_else(|| format!("snapshot '{snapname}' does not exist"))?;
            for child in vm.snapshots.values_mut() {
                if child.parent.as_deref() == Some(snapname.as_str()) {
                    child.parent = snap.parent.clone();
                }
            }
            if vm.config.get("parent") == Some(&snapname) {
                match &snap.parent {
                    Some(parent) => vm.config.insert("parent".into(), parent.clone()),
                    None => vm.config.remove("parent"),
                };
            }
            st.guest(vmid).snapshots.remove(&snapname);
            Ok(vec![])
        });
        Ok(json!(upid))
    }

    /// `GET …/snapshot/{snapname}`: the sub-commands (no check that the snapshot exists).
    pub(super) fn snapshot_index(&self, _vmid: u32, _snapname: &str) -> Result<Value, Fail> {
        Ok(json!([{ "cmd": "rollback" }, { "cmd": "config" }]))
    }

    /// `GET …/snapshot/{snapname}/config`: the snapshot's config section, values as stored.
    pub(super) fn snapshot_config(
        &self,
        caller: &Caller,
        vmid: u32,
        snapname: &str,
    ) -> Result<Value, Fail> {
        caller.require_any(
            &format!("/vms/{vmid}"),
            &["VM.Snapshot", "VM.Snapshot.Rollback", "VM.Audit"],
        )?;
        let vm = self.vm(vmid)?;
        let Some(snap) = vm.snapshots.get(snapname) else {
            return fail(500, format!("snapshot '{snapname}' does not exist"));
        };
        let mut r: serde_json::Map<String, Value> = snap
            .config
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        r.insert("snaptime".into(), json!(snap.snaptime));
        if let Some(d) = &snap.description {
            r.insert("description".into(), json!(d));
        }
        Ok(Value::Object(r))
    }

    /// `POST …/snapshot/{snapname}/rollback` (task `qmrollback`): the VM stops, gets the
    /// snapshot's config and files back, and runs again if the snapshot holds RAM (or `start`).
    pub(super) fn rollback(
        &mut self,
        caller: &Caller,
        vmid: u32,
        snapname: &str,
        p: &Params,
    ) -> Result<Value, Fail> {
        let acl = format!("/vms/{vmid}");
        caller.require_any(&acl, &["VM.Snapshot", "VM.Snapshot.Rollback"])?;
        let start = p.get("start").and_then(|v| parse_bool(v)) == Some(true);
        if start {
            caller.require(&acl, "VM.PowerMgmt")?;
        }
        self.vm(vmid)?;
        let snapname = snapname.to_string();
        let upid = self.start_task("qmrollback", &vmid.to_string(), &caller.token, |st| {
            let down_calls = st.opts.agent_down_calls;
            let vm = st.vms.get_mut(&vmid).expect("checked above");
            if vm.template {
                return Err("you can't rollback if vm is a template".into());
            }
            let snap = vm
                .snapshots
                .get(&snapname)
                .cloned()
                .ok_or_else(|| format!("snapshot '{snapname}' does not exist"))?;
            if let Some(lock) = vm.config.get("lock") {
                return Err(format!("VM is locked ({lock})"));
            }
            let mut config: BTreeMap<String, String> = vm
                .config
                .iter()
                .filter(|(k, _)| !copied(k) && *k != "lock" && *k != "vmstate")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            config.extend(
                snap.config
                    .iter()
                    .filter(|(k, _)| copied(k))
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
            config.insert("parent".into(), snapname.clone());
            if let Some(name) = config.get("name") {
                vm.name = name.clone();
            }
            vm.config = config;
            vm.running = snap.vmstate || start;
            let mut log = Vec::new();
            if snap.vmstate {
                // Resumed from RAM: the agent answers at once.
                st.agent_calls.insert(vmid, down_calls);
                log.push(format!("restoring vmstate of snapshot '{snapname}'"));
            } else if start {
                st.agent_calls.insert(vmid, 0);
            }
            let guest = st.guest(vmid);
            guest.execs.clear();
            if let Some(fs) = guest.snapshots.get(&snapname) {
                guest.fs = fs.clone();
            }
            Ok(log)
        });
        Ok(json!(upid))
    }

    /// `POST …/template` (task `qmtemplate`): a stopped VM without snapshots becomes a
    /// template; its disks are renamed `base-…` (only `disk` when given).
    pub(super) fn make_template(
        &mut self,
        caller: &Caller,
        vmid: u32,
        p: &Params,
    ) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.Allocate")?;
        let vm = self.vm(vmid)?;
        let disk = p.get("disk").cloned();
        if let Some(lock) = vm.config.get("lock") {
            return fail(500, format!("VM is locked ({lock})"));
        }
        if !vm.snapshots.is_empty() {
            return fail(
                500,
                "unable to create template, because VM contains snapshots",
            );
        }
        if vm.template && disk.is_none() {
            return fail(500, "you can't convert a template to a template");
        }
        if vm.running {
            return fail(500, "you can't convert a VM to template if VM is running");
        }
        let upid = self.start_task("qmtemplate", &vmid.to_string(), &caller.token, |st| {
            let vm = st.vms.get_mut(&vmid).expect("checked above");
            let keys: Vec<String> = vm.config.keys().cloned().collect();
            for key in keys {
                let value = &vm.config[&key];
                if !is_disk_key(&key)
                    || value.contains("media=cdrom")
                    || disk.as_ref().is_some_and(|d| *d != key)
                {
                    continue;
                }
                let renamed =
                    value.replace(&format!("vm-{vmid}-disk-"), &format!("base-{vmid}-disk-"));
                vm.config.insert(key, renamed);
            }
            vm.config.insert("template".into(), "1".into());
            vm.template = true;
            Ok(vec![])
        });
        Ok(json!(upid))
    }
}
