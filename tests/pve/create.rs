//! Creating VMs (`POST /nodes/{node}/qemu`, disks imported from uploaded images) and the SPICE
//! proxy of the fake PVE, after qemu-server's API2/Qemu.pm.

use std::collections::BTreeMap;

use regex::Regex;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::guest::Guest;
use super::http::percent_decode;
use super::model::FakeVm;
use super::qemu::{config_privilege, is_disk_key, mac_for, vmid_of};
use super::state::{Caller, Fail, Params, State, fail, fail_param};
use super::storage::image_size;
use super::syntax::parse_bool;
use super::tasks::unix_now;

/// Parameters of a create request that are not config options.
const CREATE_META: &[&str] = &[
    "node",
    "vmid",
    "pool",
    "start",
    "storage",
    "archive",
    "force",
    "unique",
    "bwlimit",
    "live-restore",
    "ha-managed",
    "import-working-storage",
];

/// A new disk: `STORAGE:SIZE_GIB` (or `SIZE_GIB` on the default storage).
fn new_disk(volid: &str) -> Option<(Option<String>, f64)> {
    let c = Regex::new(r"^(?:([^/:\s]+):)?(\d+(?:\.\d+)?)$")
        .unwrap()
        .captures(volid)?;
    Some((c.get(1).map(|m| m.as_str().to_string()), c[2].parse().ok()?))
}

/// A drive's volume and its other options (`file=` or the bare default key first).
fn split_drive(value: &str) -> (String, Vec<(String, String)>) {
    let mut volid = String::new();
    let mut opts = Vec::new();
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("file" | "volume", v)) => volid = v.to_string(),
            Some((k, v)) => opts.push((k.to_string(), v.to_string())),
            None => volid = part.to_string(),
        }
    }
    (volid, opts)
}

/// PVE's format_size for `size=`: the largest unit that divides the size.
pub(super) fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

impl State {
    /// `POST /nodes/{node}/qemu` (task `qmcreate`). New disks are `STORAGE:GIB`; `STORAGE:0,
    /// import-from=VOLID` imports an uploaded image and takes its virtual size (a qcow2's from
    /// its header, a raw image's length). A failing import fails the task and leaves no VM.
    pub(super) fn create_vm(&mut self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        let vmid = vmid_of(&p["vmid"]);
        let acl = format!("/vms/{vmid}");
        let pool = p.get("pool").cloned();
        if let Some(pool) = &pool
            && !self.pools.contains_key(pool)
        {
            return fail(
                403,
                format!("Permission check failed (pool '{pool}' does not exist)"),
            );
        }
        let default_storage = p.get("storage").cloned();
        if let Some(storage) = &default_storage {
            caller.require(&format!("/storage/{storage}"), "Datastore.AllocateSpace")?;
        }
        let start = p.get("start").and_then(|v| parse_bool(v)) == Some(true);
        if start {
            caller.require(&acl, "VM.PowerMgmt")?;
        }
        if !caller.has("VM.Allocate") {
            return fail(403, "Permission check failed");
        }
        if p.contains_key("archive") {
            return fail(501, "FakePve: restoring from an archive is not implemented");
        }
        let settings: BTreeMap<String, String> = p
            .iter()
            .filter(|(k, _)| !CREATE_META.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for key in settings.keys().filter(|k| is_disk_key(k)) {
            self.check_drive_access(
                caller,
                vmid,
                key,
                &settings[key],
                default_storage.as_deref(),
            )?;
        }
        for key in settings.keys() {
            caller.require(&acl, config_privilege(key))?;
        }
        if let Some(vm) = self.vms.get(&vmid) {
            return fail(
                500,
                format!(
                    "unable to create VM {vmid} - VM {vmid} already exists on node '{}'",
                    vm.node
                ),
            );
        }
        // The config exists (locked) while the task runs.
        let placeholder = FakeVm {
            name: settings.get("name").cloned().unwrap_or_default(),
            node: self.here.clone(),
            config: BTreeMap::from([("lock".to_string(), "create".to_string())]),
            ..FakeVm::default()
        };
        self.vms.insert(vmid, placeholder);
        let upid = self.start_task("qmcreate", &vmid.to_string(), &caller.token, |st| {
            let result = st.build_vm(vmid, settings, default_storage, pool);
            match result {
                Ok((vm, log)) => {
                    st.guests.insert(vmid, Guest::new(vmid, &vm.name));
                    st.vms.insert(vmid, vm);
                    if start {
                        st.vms.get_mut(&vmid).unwrap().running = true;
                        st.agent_calls.insert(vmid, 0);
                    }
                    Ok(log)
                }
                Err(e) => {
                    st.vms.remove(&vmid);
                    Err(format!("unable to create VM {vmid} - {e}"))
                }
            }
        });
        // A worker that failed (or never ran) leaves no config behind.
        if self.tasks[&upid].exitstatus != "OK"
            && self.vms.get(&vmid).and_then(|vm| vm.config.get("lock")) == Some(&"create".into())
        {
            self.vms.remove(&vmid);
        }
        Ok(json!(upid))
    }

    /// check_storage_access and check_drive_param for one drive of a new VM.
    fn check_drive_access(
        &self,
        caller: &Caller,
        vmid: u32,
        key: &str,
        value: &str,
        default_storage: Option<&str>,
    ) -> Result<(), Fail> {
        let (volid, opts) = split_drive(value);
        let import = opts
            .iter()
            .find(|(k, _)| k == "import-from")
            .map(|(_, v)| v);
        let cdrom = opts.iter().any(|(k, v)| k == "media" && v == "cdrom");
        if import.is_some() && new_disk(&volid).is_none_or(|(_, size)| size != 0.0) {
            return fail_param(
                key,
                "'import-from' requires special syntax - use <storage ID>:0,import-from=<source>",
            );
        }
        if volid == "none" || volid == "cloudinit" || volid.ends_with(":cloudinit") {
        } else if cdrom && volid == "cdrom" {
            caller.require("/", "Sys.Console")?;
        } else if let (false, Some((storage, _))) = (cdrom, new_disk(&volid)) {
            let Some(storage) = storage.or(default_storage.map(str::to_string)) else {
                return fail(500, "no storage ID specified (and no default storage)");
            };
            caller.require(&format!("/storage/{storage}"), "Datastore.AllocateSpace")?;
            if !self.storage(&storage)?.allows("images") {
                return fail_param(
                    "storage",
                    format!("storage '{storage}' does not support vm images"),
                );
            }
        } else {
            self.check_volume_access(caller, vmid, &volid)?;
        }
        if let Some(source) = import {
            let Some((storage, volname)) = source.split_once(':') else {
                return fail(500, "Only root can pass arbitrary filesystem paths.");
            };
            self.storage(storage)?;
            let vtype = volume_type(volname);
            if vtype != "images" && vtype != "import" {
                return fail_param(
                    key,
                    format!("{source} has wrong type '{vtype}' - needs to be 'images' or 'import'"),
                );
            }
            match owner_vmid(volname) {
                Some(owner) => caller.require(&format!("/vms/{owner}"), "VM.Clone")?,
                None => self.check_volume_access(caller, vmid, source)?,
            }
        }
        Ok(())
    }

    /// pve-storage's check_volume_access (for the cases a new VM meets).
    fn check_volume_access(&self, caller: &Caller, vmid: u32, volid: &str) -> Result<(), Fail> {
        let Some((storage, volname)) = volid.split_once(':') else {
            return fail(500, "Only root can pass arbitrary filesystem paths.");
        };
        let acl = format!("/storage/{storage}");
        if caller.has("Datastore.Allocate") {
            return Ok(());
        }
        match (volume_type(volname), owner_vmid(volname)) {
            ("iso" | "vztmpl" | "import", _) => {
                caller.require_any(&acl, &["Datastore.AllocateSpace", "Datastore.Audit"])
            }
            (_, Some(owner)) if owner == vmid => Ok(()),
            ("images", Some(owner)) => {
                caller.require(&acl, "Datastore.Audit")?;
                caller.require(&format!("/vms/{owner}"), "VM.Config.Disk")
            }
            _ => fail(500, format!("missing privileges to access {volid}")),
        }
    }

    /// The worker of a create: the VM as it is written, or why not.
    fn build_vm(
        &mut self,
        vmid: u32,
        settings: BTreeMap<String, String>,
        default_storage: Option<String>,
        pool: Option<String>,
    ) -> Result<(FakeVm, Vec<String>), String> {
        let mut config = BTreeMap::new();
        let mut log = Vec::new();
        let mut next_disk = 0;
        let mut first_disk_gib = None;
        for (key, value) in settings {
            let value = if is_disk_key(&key) {
                let (volid, opts) = split_drive(&value);
                let cdrom = opts.iter().any(|(k, v)| k == "media" && v == "cdrom");
                let rest: String = opts
                    .iter()
                    .filter(|(k, _)| k != "import-from" && k != "size")
                    .map(|(k, v)| format!(",{k}={v}"))
                    .collect();
                if let Some(storage) = volid.strip_suffix(":cloudinit") {
                    format!("{storage}:vm-{vmid}-cloudinit,media=cdrom")
                } else if let (false, Some((storage, gib))) = (cdrom, new_disk(&volid)) {
                    let storage = storage.or(default_storage.clone()).unwrap_or_default();
                    let mut bytes = (gib * (1u64 << 30) as f64) as u64;
                    if let Some((_, source)) = opts.iter().find(|(k, _)| k == "import-from") {
                        let volume = self.volume(source).ok_or_else(|| {
                            format!("failed to stat '{}'", self.volume_path(source))
                        })?;
                        let format = source.rsplit('.').next().unwrap_or("raw");
                        bytes = image_size(format, &volume.data).ok_or_else(|| {
                            "cannot import - failed to query file information with qemu-img"
                                .to_string()
                        })?;
                        log.push(format!("importing disk '{source}' to VM {vmid} ..."));
                    }
                    let name = format!("vm-{vmid}-disk-{next_disk}");
                    next_disk += 1;
                    if first_disk_gib.is_none() {
                        first_disk_gib = Some(bytes.div_ceil(1 << 30));
                    }
                    format!("{storage}:{name}{rest},size={}", format_size(bytes))
                } else {
                    value
                }
            } else if key.starts_with("net") {
                add_mac(&value, vmid)
            } else if key == "sshkeys" {
                String::from_utf8_lossy(&percent_decode(&value, false)).into_owned()
            } else {
                value
            };
            config.insert(key, value);
        }
        let uuid = |seed: &str| {
            let h = Sha256::digest(format!("{seed} {vmid}").as_bytes());
            let x: String = h.iter().take(16).map(|b| format!("{b:02x}")).collect();
            format!(
                "{}-{}-{}-{}-{}",
                &x[..8],
                &x[8..12],
                &x[12..16],
                &x[16..20],
                &x[20..]
            )
        };
        config
            .entry("smbios1".into())
            .or_insert_with(|| format!("uuid={}", uuid("smbios")));
        config
            .entry("vmgenid".into())
            .or_insert_with(|| uuid("vmgenid"));
        config.insert(
            "meta".into(),
            format!("creation-qemu=10.1.2,ctime={}", unix_now()),
        );
        let vm = FakeVm {
            name: config
                .get("name")
                .cloned()
                .unwrap_or_else(|| format!("VM{vmid}")),
            node: self.here.clone(),
            config,
            pool,
            disk_size_gib: first_disk_gib.unwrap_or(0),
            ..FakeVm::default()
        };
        Ok((vm, log))
    }

    /// Where a storage keeps a volume's file (for error messages).
    fn volume_path(&self, volid: &str) -> String {
        let (storage, volname) = volid.split_once(':').unwrap_or(("", volid));
        let base = self.storage(storage).map(|s| s.path()).unwrap_or_default();
        format!("{base}/{volname}")
    }

    /// `POST …/spiceproxy`: what remote-viewer needs (pve-access-control's
    /// remote_viewer_config). The VM must run with a SPICE display (`vga: qxl*` or `virtio*`).
    pub(super) fn spiceproxy(
        &mut self,
        caller: &Caller,
        vmid: u32,
        p: &Params,
    ) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.Console")?;
        let vm = self.vm(vmid)?;
        let title = match vm.config.get("name") {
            Some(name) => format!("VM {vmid} - {name}"),
            None => format!("VM {vmid}"),
        };
        if !vm.running {
            return fail(500, format!("VM {vmid} not running"));
        }
        let vga = vm.config.get("vga").map_or("std", |v| {
            v.split(',')
                .next()
                .unwrap_or("std")
                .trim_start_matches("type=")
        });
        if !(vga.starts_with("qxl") || vga.starts_with("virtio")) {
            return fail(500, "no spice port");
        }
        let node = self.here.clone();
        let port = 61000 + (vmid % 1000);
        let now = unix_now();
        let plain = format!(
            "pvespiceproxy:{now:08x}:{vmid}:{}:{port}",
            node.to_lowercase()
        );
        let hex = |seed: &str| -> String {
            Sha256::digest(seed.as_bytes())
                .iter()
                .take(20)
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let n = self.next_counter();
        let proxy = p.get("proxy").cloned().unwrap_or_else(|| node.clone());
        let proxy = if proxy.contains(':') {
            format!("[{proxy}]")
        } else {
            proxy
        };
        Ok(json!({
            "type": "spice",
            "title": title,
            "host": format!("{plain}:{}", hex(&format!("sig {plain} {n}"))),
            "proxy": format!("http://{proxy}:3128"),
            "tls-port": port,
            "password": hex(&format!("ticket {vmid} {now} {n}")),
            "host-subject": format!("OU=PVE Cluster Node,O=Proxmox Virtual Environment,CN={node}.lan"),
            "ca": "-----BEGIN CERTIFICATE-----\\nMIIFakePVEcaForTests\\n-----END CERTIFICATE-----\\n",
            "delete-this-file": 1,
            "secure-attention": "Ctrl+Alt+Ins",
            "toggle-fullscreen": "Shift+F11",
            "release-cursor": "Ctrl+Alt+R",
        }))
    }
}

/// What kind of volume a volume name is (pve-storage's parse_volname, simplified).
fn volume_type(volname: &str) -> &'static str {
    match volname.split('/').next().unwrap_or("") {
        "import" => "import",
        "iso" => "iso",
        "vztmpl" => "vztmpl",
        "backup" => "backup",
        "snippets" => "snippets",
        _ if owner_vmid(volname).is_some() => "images",
        _ => "unknown",
    }
}

/// The VM owning a disk volume (`vm-101-disk-0`, `base-9000-disk-0/vm-101-disk-0`).
fn owner_vmid(volname: &str) -> Option<u32> {
    let last = volname.rsplit('/').next()?;
    let c = Regex::new(r"^(?:vm|base)-(\d+)-").unwrap().captures(last)?;
    c[1].parse().ok()
}

/// A net device without MAC gets one (add_random_macs).
fn add_mac(value: &str, vmid: u32) -> String {
    let mut parts: Vec<String> = value.split(',').map(str::to_string).collect();
    let models = [
        "virtio", "e1000", "e1000e", "rtl8139", "vmxnet3", "i82551", "i82557b", "i82559er",
        "ne2k_isa", "ne2k_pci", "pcnet",
    ];
    if let Some(first) = parts.first_mut()
        && models.contains(&first.as_str())
    {
        *first = format!("{first}={}", mac_for(vmid));
    }
    parts.join(",")
}
