//! The QEMU VM handlers of the fake PVE: list, clone, config, resize, power, status, destroy.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::guest::Guest;
use super::http::percent_decode;
use super::http::percent_encode;
use super::model::FakeVm;
use super::schema::Schema;
use super::state::{Caller, Fail, Params, State, fail};
use super::syntax::parse_bool;

/// Keys of a config update that are not config options.
const CONFIG_META: &[&str] = &[
    "node",
    "vmid",
    "digest",
    "skiplock",
    "delete",
    "revert",
    "background_delay",
];

impl State {
    // ----- VMs -----

    pub(super) fn list_vms(&self, caller: &Caller) -> Result<Value, Fail> {
        if !caller.has("VM.Audit") {
            return Ok(json!([]));
        }
        let list = self
            .vms
            .iter()
            .filter(|(_, vm)| vm.node == self.here)
            .map(|(vmid, vm)| {
                let mut r = json!({
                    "vmid": vmid,
                    "name": vm.name,
                    "status": if vm.running { "running" } else { "stopped" },
                    "cpus": vm.cores(),
                    "maxmem": vm.memory_mib() * 1024 * 1024,
                    "maxdisk": vm.disk_size_gib * 1024 * 1024 * 1024,
                    "uptime": if vm.running { 42 } else { 0 },
                });
                if vm.template {
                    r["template"] = json!(1);
                }
                if let Some(lock) = vm.config.get("lock") {
                    r["lock"] = json!(lock);
                }
                r
            })
            .collect();
        Ok(Value::Array(list))
    }

    pub(super) fn clone_vm(
        &mut self,
        caller: &Caller,
        vmid: u32,
        p: &Params,
    ) -> Result<Value, Fail> {
        let newid = vmid_of(&p["newid"]);
        caller.require(&format!("/vms/{vmid}"), "VM.Clone")?;
        match p.get("pool") {
            Some(pool) => caller.require(&format!("/pool/{pool}"), "VM.Allocate")?,
            None => caller.require(&format!("/vms/{newid}"), "VM.Allocate")?,
        }
        let source = self.vm(vmid)?.clone();
        // qemu-server: a target that is this node is no target; others must exist.
        let target = p.get("target").filter(|t| **t != self.here).cloned();
        if let Some(target) = &target
            && !self.nodes.iter().any(|n| n.name == *target)
        {
            return fail(500, format!("no such cluster node '{target}'"));
        }
        let full = p
            .get("full")
            .and_then(|v| parse_bool(v))
            .unwrap_or(!source.template);
        if !full {
            for key in ["storage", "format"] {
                if p.contains_key(key) {
                    return fail(
                        500,
                        format!("parameter '{key}' not allowed for linked clones"),
                    );
                }
            }
            if !source.template {
                return fail(
                    500,
                    "Linked clone feature is not supported for drive 'scsi0'",
                );
            }
        }
        let storage = p
            .get("storage")
            .cloned()
            .unwrap_or_else(|| self.opts.storage.clone());
        if full {
            caller.require(&format!("/storage/{storage}"), "Datastore.AllocateSpace")?;
            if !self.storage(&storage)?.allows("images") {
                return super::state::fail_param(
                    "storage",
                    format!("storage '{storage}' does not support vm images"),
                );
            }
        }
        if let Some(target) = &target {
            // Another node sees only shared storages.
            if full && p.contains_key("storage") && !self.storage(&storage)?.shared {
                return fail(
                    500,
                    format!("can't clone to non-shared storage '{storage}'"),
                );
            }
            let local = source.config.iter().any(|(key, value)| {
                is_disk_key(key)
                    && value
                        .split_once(':')
                        .and_then(|(s, _)| self.storage(s).ok())
                        .is_some_and(|s| !s.shared)
            });
            if local {
                return fail(
                    500,
                    format!("can't clone VM to node '{target}' (VM uses local storage)"),
                );
            }
        }
        if let Some(pool) = p.get("pool")
            && !self.pools.contains_key(pool)
        {
            return fail(500, format!("pool '{pool}' does not exist"));
        }
        if self.vms.contains_key(&newid) {
            return fail(
                500,
                format!("unable to create VM {newid}: config file already exists"),
            );
        }
        let name = p
            .get("name")
            .cloned()
            .unwrap_or_else(|| format!("Copy-of-VM-{}", source.name));
        let pool = p.get("pool").cloned();
        let description = p.get("description").cloned();
        // PVE files a clone task under the source VM, not the new one.
        let upid = self.start_task("qmclone", &vmid.to_string(), &caller.token, |st| {
            let mut config = BTreeMap::new();
            for (key, value) in &source.config {
                let value = if is_disk_key(key) {
                    clone_disk(value, vmid, newid, full.then_some(storage.as_str()))
                } else if key.starts_with("net") {
                    value.replace(&mac_for(vmid), &mac_for(newid))
                } else {
                    value.clone()
                };
                config.insert(key.clone(), value);
            }
            config.remove("template");
            config.insert("name".into(), name.clone());
            config.insert("lock".into(), "clone".into());
            if let Some(d) = description {
                config.insert("description".into(), d);
            }
            let vm = FakeVm {
                node: target.unwrap_or_else(|| st.here.clone()),
                config,
                running: false,
                template: false,
                pool,
                disk_size_gib: source.disk_size_gib,
                ..FakeVm::default()
            };
            st.guests.insert(newid, Guest::new(newid, &name));
            st.vms.insert(newid, FakeVm { name, ..vm });
            Ok(vec![format!(
                "create {} clone of drive scsi0",
                if full { "full" } else { "linked" }
            )])
        });
        // The new VM stays locked (`lock: clone`) until the task is seen to end.
        let task = self.tasks.get_mut(&upid).expect("just started");
        if task.exitstatus == "OK" {
            task.lock_vmid = Some(newid);
        }
        Ok(json!(upid))
    }

    pub(super) fn get_config(&self, caller: &Caller, vmid: u32) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.Audit")?;
        let vm = self.vm(vmid)?;
        let schema = Schema::load();
        let types = schema
            .returns("GET", &format!("/nodes/{}/qemu/{vmid}/config", self.here))
            .and_then(|r| r.get("properties"))
            .and_then(Value::as_object);
        let mut out = serde_json::Map::new();
        for (key, value) in &vm.config {
            let kind = types
                .and_then(|t| t.get(key))
                .and_then(|p| p.get("type"))
                .and_then(Value::as_str);
            let typed = match kind {
                Some("integer") => value.parse::<i64>().map(Value::from).ok(),
                Some("number") => value.parse::<f64>().ok().map(Value::from),
                Some("boolean") => parse_bool(value).map(|b| Value::from(u8::from(b))),
                _ => None,
            };
            let typed = typed.unwrap_or_else(|| {
                if key == "sshkeys" {
                    // PVE hands sshkeys back URL-encoded, as it was given.
                    json!(percent_encode(value))
                } else {
                    json!(value)
                }
            });
            out.insert(key.clone(), typed);
        }
        out.insert("digest".into(), json!(vm.digest()));
        Ok(Value::Object(out))
    }

    pub(super) fn update_config(
        &mut self,
        caller: &Caller,
        vmid: u32,
        p: &Params,
        async_post: bool,
    ) -> Result<Value, Fail> {
        let acl_path = format!("/vms/{vmid}");
        let deletes: Vec<String> = p
            .get("delete")
            .map(|d| {
                d.split([',', ';', ' '])
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let sets: Vec<(&String, &String)> = p
            .iter()
            .filter(|(k, _)| !CONFIG_META.contains(&k.as_str()))
            .collect();
        for key in sets
            .iter()
            .map(|(k, _)| k.as_str())
            .chain(deletes.iter().map(String::as_str))
        {
            caller.require(&acl_path, config_privilege(key))?;
        }
        self.vm(vmid)?;
        if self.lock_timeout_pending {
            self.lock_timeout_pending = false;
            return fail(
                500,
                format!("can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout"),
            );
        }
        self.check_unlocked(vmid, p)?;
        if let Some(digest) = p.get("digest")
            && *digest != self.vm(vmid)?.digest()
        {
            return fail(
                500,
                "detected modified configuration - file changed by other user? Try again.",
            );
        }
        if let Some(key) = deletes.iter().find(|k| p.contains_key(k.as_str())) {
            return fail(
                400,
                format!("you can't use '-{key}' and '-delete {key}' at the same time"),
            );
        }
        let sets: Vec<(String, String)> = sets
            .into_iter()
            .map(|(k, v)| {
                let v = if k == "sshkeys" {
                    String::from_utf8_lossy(&percent_decode(v, false)).into_owned()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect();
        let apply = move |st: &mut State| -> Result<Vec<String>, String> {
            let vm = st.vms.get_mut(&vmid).expect("checked above");
            let mut log = Vec::new();
            for key in &deletes {
                vm.config.remove(key);
                log.push(format!("delete {key}"));
            }
            for (key, value) in sets {
                log.push(format!("update VM {vmid}: -{key} {value}"));
                if key == "name" {
                    vm.name = value.clone();
                }
                vm.config.insert(key, value);
            }
            Ok(log)
        };
        if async_post {
            Ok(json!(self.start_task(
                "qmconfig",
                &vmid.to_string(),
                &caller.token,
                apply
            )))
        } else {
            apply(self).map_err(|e| (500, e))?;
            Ok(Value::Null)
        }
    }

    /// PVE 9's resize is a task: a missing disk or a shrink fails the task, not the request.
    pub(super) fn resize(&mut self, caller: &Caller, vmid: u32, p: &Params) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.Config.Disk")?;
        self.check_unlocked(vmid, p)?;
        let disk = p["disk"].clone();
        let size = p["size"].clone();
        let upid = self.start_task("resize", &vmid.to_string(), &caller.token, |st| {
            let vm = st.vms.get_mut(&vmid).expect("checked above");
            let drive = vm
                .config
                .get(&disk)
                .cloned()
                .ok_or_else(|| format!("disk '{disk}' does not exist"))?;
            let current = drive_size_gib(&drive).unwrap_or(vm.disk_size_gib as f64);
            let (grow, amount) = match size.strip_prefix('+') {
                Some(rest) => (true, rest),
                None => (false, size.as_str()),
            };
            let amount = size_gib(amount).ok_or_else(|| format!("invalid size '{size}'"))?;
            let new = if grow { current + amount } else { amount };
            if new < current {
                return Err("shrinking disks is not supported".into());
            }
            let new_gib = new.ceil() as u64;
            let drive = regex::Regex::new(r"size=[0-9.]+[KMGT]?")
                .unwrap()
                .replace(&drive, format!("size={new_gib}G"))
                .into_owned();
            let first_disk = vm
                .config
                .keys()
                .find(|k| is_disk_key(k) && !vm.config[*k].contains("media=cdrom"))
                .cloned();
            if first_disk.as_deref() == Some(disk.as_str()) {
                vm.disk_size_gib = new_gib;
            }
            vm.config.insert(disk.clone(), drive);
            Ok(vec![format!("resize disk {disk} to {new_gib}G")])
        });
        Ok(json!(upid))
    }

    pub(super) fn power(
        &mut self,
        caller: &Caller,
        vmid: u32,
        action: &str,
    ) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.PowerMgmt")?;
        let vm = self.vm(vmid)?;
        let kind = match action {
            "start" => {
                if vm.template {
                    return fail(500, "you can't start a vm if it's a template");
                }
                if vm.running {
                    return fail(500, format!("VM {vmid} already running"));
                }
                "qmstart"
            }
            "shutdown" => "qmshutdown",
            "stop" => "qmstop",
            other => {
                return fail(
                    501,
                    format!(
                        "Method 'POST /nodes/{{node}}/qemu/{{vmid}}/status/{other}' not implemented"
                    ),
                );
            }
        };
        self.check_unlocked(vmid, &Params::new())?;
        let upid = self.start_task(kind, &vmid.to_string(), &caller.token, |st| {
            let vm = st.vms.get_mut(&vmid).expect("checked above");
            vm.running = kind == "qmstart";
            if vm.running {
                st.agent_calls.insert(vmid, 0);
            }
            // A guest that stops forgets its agent's processes.
            st.guest(vmid).execs.clear();
            Ok(vec![])
        });
        Ok(json!(upid))
    }

    pub(super) fn status_current(&self, caller: &Caller, vmid: u32) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.Audit")?;
        let vm = self.vm(vmid)?;
        let status = if vm.running { "running" } else { "stopped" };
        let mut r = json!({
            "vmid": vmid,
            "name": vm.name,
            "status": status,
            "qmpstatus": status,
            "cpus": vm.cores(),
            "maxmem": vm.memory_mib() * 1024 * 1024,
            "maxdisk": vm.disk_size_gib * 1024 * 1024 * 1024,
            "uptime": if vm.running { 42 } else { 0 },
            "ha": { "managed": 0 },
        });
        if vm.agent_enabled() {
            r["agent"] = json!(1);
        }
        if vm.template {
            r["template"] = json!(1);
        }
        if let Some(lock) = vm.config.get("lock") {
            r["lock"] = json!(lock);
        }
        Ok(r)
    }

    pub(super) fn destroy(&mut self, caller: &Caller, vmid: u32) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.Allocate")?;
        if self.vm(vmid)?.running {
            return fail(500, format!("VM {vmid} is running - destroy failed"));
        }
        self.check_unlocked(vmid, &Params::new())?;
        let upid = self.start_task("qmdestroy", &vmid.to_string(), &caller.token, |st| {
            st.vms.remove(&vmid);
            st.agent_calls.remove(&vmid);
            st.guests.remove(&vmid);
            Ok(vec![format!("destroyed VM {vmid}")])
        });
        Ok(json!(upid))
    }
}

/// The privilege PVE requires to set or delete one config option (qemu-server's
/// check_vm_modify_config_perm, simplified).
pub(super) fn config_privilege(key: &str) -> &'static str {
    let base = key.trim_end_matches(|c: char| c.is_ascii_digit());
    match base {
        "ide" | "sata" | "scsi" | "virtio" | "efidisk" | "tpmstate" | "unused" => "VM.Config.Disk",
        "cores" | "sockets" | "cpu" | "vcpus" | "cpulimit" | "cpuunits" | "affinity" | "numa" => {
            "VM.Config.CPU"
        }
        "memory" | "balloon" | "shares" => "VM.Config.Memory",
        "net" => "VM.Config.Network",
        "ciuser" | "cipassword" | "sshkeys" | "ipconfig" | "nameserver" | "searchdomain"
        | "citype" | "cicustom" | "ciupgrade" => "VM.Config.Cloudinit",
        "bios" | "machine" | "vga" | "scsihw" | "serial" | "usb" | "hostpci" | "audio" | "rng"
        | "parallel" | "tablet" | "kvm" | "acpi" | "arch" | "virtiofs" => "VM.Config.HWType",
        _ => "VM.Config.Options",
    }
}

pub(super) fn is_disk_key(key: &str) -> bool {
    let base = key.trim_end_matches(|c: char| c.is_ascii_digit());
    base != key
        && matches!(
            base,
            "ide" | "sata" | "scsi" | "virtio" | "efidisk" | "tpmstate"
        )
}

/// A drive of VM `old` as it is in clone `new`: linked clones keep the base image as backing
/// (`storage:base-9000-disk-0/vm-101-disk-0`), full clones get a fresh volume on `full_storage`.
pub(super) fn clone_disk(drive: &str, old: u32, new: u32, full_storage: Option<&str>) -> String {
    let (volume, options) = drive.split_once(',').unwrap_or((drive, ""));
    let Some((storage, name)) = volume.split_once(':') else {
        return drive.to_string();
    };
    let suffix = if options.is_empty() {
        String::new()
    } else {
        format!(",{options}")
    };
    if name.ends_with("-cloudinit") {
        return format!("{storage}:vm-{new}-cloudinit{suffix}");
    }
    let disk = name.rsplit('/').next().unwrap_or(name);
    let new_disk = disk
        .replace(&format!("base-{old}-"), &format!("vm-{new}-"))
        .replace(&format!("vm-{old}-"), &format!("vm-{new}-"));
    match full_storage {
        Some(target) => format!("{target}:{new_disk}{suffix}"),
        None => format!("{storage}:{disk}/{new_disk}{suffix}"),
    }
}

pub(super) fn drive_size_gib(drive: &str) -> Option<f64> {
    let caps = regex::Regex::new(r"size=([0-9.]+[KMGT]?)")
        .unwrap()
        .captures(drive)?;
    size_gib(&caps[1])
}

/// `10`, `512M`, `8G`, `1.5T` → GiB (plain numbers are bytes, as in PVE).
pub(super) fn size_gib(size: &str) -> Option<f64> {
    let (number, unit) = match size.chars().last()? {
        c @ ('K' | 'M' | 'G' | 'T') => (&size[..size.len() - 1], c),
        _ => (size, 'B'),
    };
    let n: f64 = number.parse().ok()?;
    Some(match unit {
        'K' => n / (1024.0 * 1024.0),
        'M' => n / 1024.0,
        'G' => n,
        'T' => n * 1024.0,
        _ => n / (1024.0 * 1024.0 * 1024.0),
    })
}

pub(super) fn vmid_of(s: &str) -> u32 {
    s.parse().expect("vmid checked by the schema")
}

pub(super) fn mac_for(vmid: u32) -> String {
    let b = vmid.to_be_bytes();
    format!("BC:24:11:{:02X}:{:02X}:{:02X}", b[1], b[2], b[3])
}
