//! The fake PVE's state, its callers and the router from (method, path) to the handlers in
//! `qemu.rs`, `tasks.rs` and `access.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use super::guest::Guest;
use super::model::{
    FakeAcl, FakeNode, FakeOptions, FakeStorage, FakeTask, FakeUser, FakeVm, Recorded,
    all_privileges,
};
use super::qemu::{mac_for, vmid_of};
use super::syntax::parse_bool;

pub(super) type Params = BTreeMap<String, String>;
/// An error reply: HTTP status and message.
pub(super) type Fail = (u16, String);

pub(super) fn fail<T>(code: u16, message: impl Into<String>) -> Result<T, Fail> {
    Err((code, message.into()))
}

/// Marks a [`Fail`] message as a parameter exception (`PARAM_ERROR` `param` `\0` `why`): the
/// server answers 400 "Parameter verification failed." with `errors: {param: why}`, as PVE's
/// raise_param_exc does.
pub(super) const PARAM_ERROR: &str = "\u{1}param:";

pub(super) fn fail_param<T>(param: &str, why: impl Into<String>) -> Result<T, Fail> {
    Err((400, format!("{PARAM_ERROR}{param}\0{}", why.into())))
}

/// A stored volume (an upload, an imported disk's source).
#[derive(Clone, Debug)]
pub(super) struct Volume {
    pub(super) data: Vec<u8>,
    pub(super) ctime: u64,
}

/// The caller of a request: its token and privileges.
pub(super) struct Caller {
    pub(super) token: String,
    pub(super) privs: BTreeSet<String>,
}

impl Caller {
    pub(super) fn has(&self, privilege: &str) -> bool {
        self.privs.contains(privilege)
    }

    pub(super) fn require(&self, acl_path: &str, privilege: &str) -> Result<(), Fail> {
        if self.has(privilege) {
            Ok(())
        } else {
            fail(
                403,
                format!("Permission check failed ({acl_path}, {privilege})"),
            )
        }
    }

    pub(super) fn require_any(&self, acl_path: &str, privileges: &[&str]) -> Result<(), Fail> {
        if privileges.iter().any(|p| self.has(p)) {
            Ok(())
        } else {
            fail(
                403,
                format!(
                    "Permission check failed ({acl_path}, {})",
                    privileges.join("|")
                ),
            )
        }
    }
}

pub(super) struct State {
    pub(super) opts: FakeOptions,
    pub(super) vms: BTreeMap<u32, FakeVm>,
    /// Pool id → comment (members: [`FakeVm::pool`]).
    pub(super) pools: BTreeMap<String, Option<String>>,
    pub(super) users: BTreeMap<String, FakeUser>,
    pub(super) roles: BTreeMap<String, BTreeSet<String>>,
    pub(super) acls: Vec<FakeAcl>,
    pub(super) tasks: BTreeMap<String, FakeTask>,
    pub(super) requests: Vec<Recorded>,
    pub(super) violations: Vec<String>,
    pub(super) deprecated: Vec<String>,
    /// Agent calls since the VM's last start.
    pub(super) agent_calls: BTreeMap<u32, u32>,
    pub(super) lock_timeout_pending: bool,
    pub(super) nextid_race_pending: bool,
    pub(super) counter: u64,
    /// Replies to inject, first match first ([`super::server::FakePve::fail_next`]).
    pub(super) faults: Vec<Fault>,
    /// The cluster's nodes, the first one serving the API.
    pub(super) nodes: Vec<FakeNode>,
    pub(super) storages: Vec<FakeStorage>,
    /// (node, volid) → volume; the node is empty for volumes of shared storages.
    pub(super) volumes: BTreeMap<(String, String), Volume>,
    /// VMID → the guest's files, processes and agent state.
    pub(super) guests: BTreeMap<u32, Guest>,
    /// The node of the request being served (`/nodes/{node}/…`).
    pub(super) here: String,
    /// Set by a handler: the reply waits this long, without the state lock (a hanging agent).
    pub(super) sleep: Option<Duration>,
    /// The file part of the upload being served.
    pub(super) upload_data: Option<Vec<u8>>,
}

/// A reply the fake gives instead of its own to the next matching request.
pub(super) struct Fault {
    pub(super) method: String,
    /// Below `/api2/json`, percent-decoded, as in [`Recorded::path`].
    pub(super) path: String,
    pub(super) status: u16,
    pub(super) body: String,
    /// Whether the request is carried out before the reply is replaced.
    pub(super) carried_out: bool,
}

impl State {
    pub(super) fn new(opts: FakeOptions) -> State {
        let mut nodes = opts.nodes.clone();
        if !nodes.iter().any(|n| n.name == opts.node) {
            nodes.insert(0, FakeNode::new(&opts.node));
        }
        let mut storages = if opts.storages.is_empty() {
            FakeStorage::defaults(&opts.storage)
        } else {
            opts.storages.clone()
        };
        if !storages.iter().any(|s| s.name == opts.storage) {
            storages.push(FakeStorage::new(
                &opts.storage,
                "lvmthin",
                &["images", "rootdir"],
                false,
            ));
        }
        let t = opts.template_vmid;
        let storage = &opts.storage;
        let config: BTreeMap<String, String> = [
            ("name", opts.template_name.clone()),
            ("template", "1".into()),
            ("cores", "2".into()),
            ("memory", "2048".into()),
            ("agent", "1".into()),
            ("ostype", "l26".into()),
            ("scsihw", "virtio-scsi-single".into()),
            ("scsi0", format!("{storage}:base-{t}-disk-0,size=8G")),
            ("ide2", format!("{storage}:vm-{t}-cloudinit,media=cdrom")),
            ("net0", format!("virtio={},bridge=vmbr0", mac_for(t))),
            ("boot", "order=scsi0".into()),
            ("serial0", "socket".into()),
            ("vga", "serial0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let template = FakeVm {
            name: opts.template_name.clone(),
            node: opts.node.clone(),
            config,
            running: false,
            template: true,
            pool: None,
            disk_size_gib: 8,
            ..FakeVm::default()
        };
        State {
            guests: BTreeMap::from([(t, Guest::new(t, &opts.template_name))]),
            here: opts.node.clone(),
            nodes,
            storages,
            volumes: BTreeMap::new(),
            sleep: None,
            upload_data: None,
            vms: BTreeMap::from([(t, template)]),
            pools: BTreeMap::new(),
            users: BTreeMap::new(),
            roles: BTreeMap::new(),
            acls: Vec::new(),
            tasks: BTreeMap::new(),
            requests: Vec::new(),
            violations: Vec::new(),
            deprecated: Vec::new(),
            agent_calls: BTreeMap::new(),
            lock_timeout_pending: opts.lock_timeout_once,
            nextid_race_pending: opts.nextid_race,
            counter: 0,
            faults: Vec::new(),
            opts,
        }
    }

    /// The caller for a token id and secret: a configured token, or one created through the API
    /// (whose privileges come from the ACLs naming it, or its user when `privsep` is off).
    pub(super) fn authenticate(&self, token_id: &str, secret: &str) -> Option<Caller> {
        if let Some((_, s, privs)) = self.opts.tokens.iter().find(|(id, _, _)| id == token_id) {
            if s != secret {
                return None;
            }
            let mut privs: BTreeSet<String> = privs.iter().cloned().collect();
            privs.extend(self.acl_privileges("token", token_id));
            return Some(Caller {
                token: token_id.to_string(),
                privs,
            });
        }
        let (userid, name) = token_id.split_once('!')?;
        let user = self.users.get(userid)?;
        let token = user.tokens.get(name)?;
        if token.secret != secret || !user.enable {
            return None;
        }
        let mut privs = self.acl_privileges("token", token_id);
        if !token.privsep {
            privs.extend(self.acl_privileges("user", userid));
        }
        Some(Caller {
            token: token_id.to_string(),
            privs,
        })
    }

    pub(super) fn acl_privileges(&self, kind: &str, ugid: &str) -> BTreeSet<String> {
        self.acls
            .iter()
            .filter(|a| a.kind == kind && a.ugid == ugid)
            .flat_map(|a| self.role_privileges(&a.roleid).unwrap_or_default())
            .collect()
    }

    /// A custom or (approximated) built-in role's privileges.
    pub(super) fn role_privileges(&self, roleid: &str) -> Option<BTreeSet<String>> {
        if let Some(privs) = self.roles.get(roleid) {
            return Some(privs.clone());
        }
        let all = all_privileges();
        let select = |f: &dyn Fn(&str) -> bool| -> BTreeSet<String> {
            all.iter().filter(|p| f(p)).cloned().collect()
        };
        let privs = match roleid {
            "Administrator" => select(&|_| true),
            "NoAccess" => BTreeSet::new(),
            "PVEAdmin" => select(&|p| {
                !matches!(
                    p,
                    "Permissions.Modify" | "Realm.Allocate" | "Sys.Modify" | "Sys.PowerMgmt"
                )
            }),
            "PVEAuditor" => select(&|p| p.ends_with(".Audit")),
            "PVEVMAdmin" => select(&|p| p.starts_with("VM.")),
            "PVEVMUser" => select(&|p| {
                matches!(
                    p,
                    "VM.Audit"
                        | "VM.Console"
                        | "VM.Backup"
                        | "VM.Config.CDROM"
                        | "VM.Config.Cloudinit"
                        | "VM.PowerMgmt"
                        | "VM.GuestAgent.Audit"
                )
            }),
            "PVETemplateUser" => select(&|p| matches!(p, "VM.Clone" | "VM.Audit")),
            "PVEPoolAdmin" => select(&|p| p.starts_with("Pool.")),
            "PVEPoolUser" => select(&|p| p == "Pool.Audit"),
            "PVEUserAdmin" => {
                select(&|p| matches!(p, "User.Modify" | "Group.Allocate" | "Realm.AllocateUser"))
            }
            "PVEDatastoreAdmin" => select(&|p| p.starts_with("Datastore.")),
            "PVEDatastoreUser" => {
                select(&|p| matches!(p, "Datastore.AllocateSpace" | "Datastore.Audit"))
            }
            "PVESDNUser" => select(&|p| matches!(p, "SDN.Audit" | "SDN.Use")),
            _ => return None,
        };
        Some(privs)
    }

    /// The first fault registered for `method path`, removed.
    pub(super) fn take_fault(&mut self, method: &str, path: &str) -> Option<Fault> {
        let at = self
            .faults
            .iter()
            .position(|f| f.method == method && f.path == path)?;
        Some(self.faults.remove(at))
    }

    pub(super) fn next_counter(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// The router: one arm per implemented (method, path) of the PVE API.
    pub(super) fn route(
        &mut self,
        caller: &Caller,
        method: &str,
        segs: &[&str],
        p: &Params,
    ) -> Result<Value, Fail> {
        match (method, segs) {
            ("GET", ["cluster", "nextid"]) => self.nextid(p),
            ("GET", ["cluster", "resources"]) => self.resources(caller, p),
            ("GET", ["nodes"]) => self.list_nodes(caller),
            ("POST", ["nodes", node, "storage", storage, "upload"]) => {
                // Not proxied: pveproxy takes the file, then copies it to the node.
                self.here = node.to_string();
                self.upload(caller, storage, p)
            }
            ("GET", ["nodes", node, "qemu", vmid, "snapshot", snapname]) => {
                // Not proxied either: a static index.
                self.here = node.to_string();
                self.snapshot_index(vmid_of(vmid), snapname)
            }
            (_, ["nodes", node, rest @ ..]) => {
                self.here = node.to_string();
                self.check_node(node)?;
                self.route_node(caller, method, rest, p)
            }
            ("GET", ["pools"]) => self.list_pools(caller, p),
            ("POST", ["pools"]) => self.create_pool(caller, p),
            ("PUT", ["pools"]) => self.update_pool(caller, &p["poolid"], p),
            ("DELETE", ["pools"]) => self.delete_pool(caller, &p["poolid"]),
            ("GET", ["pools", poolid]) => self.get_pool(caller, poolid),
            ("PUT", ["pools", poolid]) => self.update_pool(caller, poolid, p),
            ("DELETE", ["pools", poolid]) => self.delete_pool(caller, poolid),
            ("GET", ["access", "users"]) => self.list_users(caller),
            ("POST", ["access", "users"]) => self.create_user(caller, p),
            ("POST", ["access", "users", userid, "token", tokenid]) => {
                self.create_token(caller, userid, tokenid, p)
            }
            ("GET", ["access", "users", userid, "token", tokenid]) => {
                self.get_token(caller, userid, tokenid)
            }
            ("DELETE", ["access", "users", userid, "token", tokenid]) => {
                self.delete_token(caller, userid, tokenid)
            }
            ("GET", ["access", "acl"]) => self.list_acls(caller),
            ("PUT", ["access", "acl"]) => self.update_acl(caller, p),
            ("GET", ["access", "roles"]) => self.list_roles(),
            ("POST", ["access", "roles"]) => self.create_role(caller, p),
            ("PUT", ["access", "roles", roleid]) => self.update_role(caller, roleid, p),
            _ => not_implemented(method, &segs.join("/")),
        }
    }

    /// `/nodes/{node}/…` on a node that answers ([`State::here`]).
    fn route_node(
        &mut self,
        caller: &Caller,
        method: &str,
        segs: &[&str],
        p: &Params,
    ) -> Result<Value, Fail> {
        match (method, segs) {
            ("GET", ["qemu"]) => self.list_vms(caller),
            ("POST", ["qemu"]) => self.create_vm(caller, p),
            ("GET", ["storage"]) => self.list_storages(caller, p),
            ("GET", ["storage", storage, "content"]) => self.storage_content(caller, storage, p),
            ("DELETE", ["storage", storage, "content", volume @ ..]) if !volume.is_empty() => {
                // The rest of the path is the volume (see `schema::join_fragments`).
                self.delete_volume(caller, storage, &volume.join("/"))
            }
            ("GET", ["tasks"]) => self.list_tasks(caller, p),
            ("GET", ["tasks", upid, "status"]) => self.task_status(caller, upid),
            ("GET", ["tasks", upid, "log"]) => self.task_log(caller, upid, p),
            (_, ["qemu", vmid, rest @ ..]) => self.route_vm(caller, method, vmid_of(vmid), rest, p),
            _ => not_implemented(method, &format!("nodes/{}/{}", self.here, segs.join("/"))),
        }
    }

    /// `/nodes/{node}/qemu/{vmid}/…`.
    fn route_vm(
        &mut self,
        caller: &Caller,
        method: &str,
        vmid: u32,
        segs: &[&str],
        p: &Params,
    ) -> Result<Value, Fail> {
        match (method, segs) {
            ("DELETE", []) => self.destroy(caller, vmid),
            ("POST", ["clone"]) => self.clone_vm(caller, vmid, p),
            ("GET", ["config"]) => self.get_config(caller, vmid),
            ("POST" | "PUT", ["config"]) => self.update_config(caller, vmid, p, method == "POST"),
            ("PUT", ["resize"]) => self.resize(caller, vmid, p),
            ("POST", ["status", action]) => self.power(caller, vmid, action),
            ("GET", ["status", "current"]) => self.status_current(caller, vmid),
            ("POST", ["template"]) => self.make_template(caller, vmid, p),
            ("POST", ["spiceproxy"]) => self.spiceproxy(caller, vmid, p),
            ("GET", ["snapshot"]) => self.list_snapshots(caller, vmid),
            ("POST", ["snapshot"]) => self.create_snapshot(caller, vmid, p),
            ("DELETE", ["snapshot", snap]) => self.delete_snapshot(caller, vmid, snap, p),
            ("GET", ["snapshot", snap, "config"]) => self.snapshot_config(caller, vmid, snap),
            ("POST", ["snapshot", snap, "rollback"]) => self.rollback(caller, vmid, snap, p),
            ("POST", ["agent", "ping"]) => self.agent(caller, vmid, "ping"),
            ("POST", ["agent", "shutdown"]) => self.agent_shutdown(caller, vmid),
            ("GET", ["agent", "network-get-interfaces"]) => {
                self.agent(caller, vmid, "network-get-interfaces")
            }
            ("POST", ["agent", "exec"]) => self.agent_exec(caller, vmid, p),
            ("GET", ["agent", "exec-status"]) => self.agent_exec_status(caller, vmid, p),
            ("GET", ["agent", "file-read"]) => self.agent_file_read(caller, vmid, p),
            ("POST", ["agent", "file-write"]) => self.agent_file_write(caller, vmid, p),
            _ => not_implemented(
                method,
                &format!("nodes/{}/qemu/{vmid}/{}", self.here, segs.join("/")),
            ),
        }
    }

    // ----- helpers -----

    /// Whether `/nodes/{node}/…` reaches a node: an unknown one fails PVE's hostname lookup, an
    /// offline one fails like pveproxy's proxy request (HTTP 595, see [`PROXY_FAILURE`]).
    pub(super) fn check_node(&self, node: &str) -> Result<(), Fail> {
        match self.nodes.iter().find(|n| n.name == node) {
            Some(n) if n.online => Ok(()),
            Some(_) => fail(595, PROXY_FAILURE),
            None => fail(
                500,
                format!(
                    "hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known"
                ),
            ),
        }
    }

    /// A VM on the node of the request ([`State::here`]), as qemu-server's load_config finds it.
    pub(super) fn vm(&self, vmid: u32) -> Result<&FakeVm, Fail> {
        self.vms
            .get(&vmid)
            .filter(|vm| vm.node == self.here)
            .ok_or_else(|| {
                (
                    500,
                    format!(
                        "Configuration file 'nodes/{}/qemu-server/{vmid}.conf' does not exist",
                        self.here
                    ),
                )
            })
    }

    pub(super) fn vm_mut(&mut self, vmid: u32) -> Result<&mut FakeVm, Fail> {
        self.vm(vmid)?;
        Ok(self.vms.get_mut(&vmid).expect("just found"))
    }

    pub(super) fn storage(&self, name: &str) -> Result<&FakeStorage, Fail> {
        self.storages
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| (500, format!("storage '{name}' does not exist")))
    }

    /// The guest of a VM, created (seeded) when the VM got none yet.
    pub(super) fn guest(&mut self, vmid: u32) -> &mut Guest {
        let name = self
            .vms
            .get(&vmid)
            .map_or("", |vm| vm.name.as_str())
            .to_string();
        self.guests
            .entry(vmid)
            .or_insert_with(|| Guest::new(vmid, &name))
    }

    /// PVE's check_lock: a locked VM refuses changes unless `skiplock` is set.
    pub(super) fn check_unlocked(&self, vmid: u32, p: &Params) -> Result<(), Fail> {
        let skiplock = p.get("skiplock").and_then(|v| parse_bool(v)) == Some(true);
        match self.vm(vmid)?.config.get("lock") {
            Some(lock) if !skiplock => fail(500, format!("VM is locked ({lock})")),
            _ => Ok(()),
        }
    }

    pub(super) fn pool_members(&self, poolid: &str) -> BTreeSet<u32> {
        self.vms
            .iter()
            .filter(|(_, vm)| vm.pool.as_deref() == Some(poolid))
            .map(|(id, _)| *id)
            .collect()
    }
}

/// What pveproxy answers (HTTP 595, the reason phrase, an empty body) when the node it proxies a
/// request to does not answer: AnyEvent::HTTP's status for a failed connection, with `$!`.
pub(super) const PROXY_FAILURE: &str = "No route to host";

fn not_implemented(method: &str, path: &str) -> Result<Value, Fail> {
    fail(501, format!("Method '{method} /{path}' not implemented"))
}
