//! A fake Proxmox VE API server for tests: plain HTTP on 127.0.0.1, one node, QEMU VMs cloned
//! from a template, tasks, guest agent, pools, users, API tokens and ACLs.
//!
//! Every request is first checked against the real PVE 9.1 API schema ([`Schema::check`]); a
//! request PVE would refuse gets HTTP 400 and is recorded in [`FakePve::violations`], so a test
//! can assert that the client under test sent nothing PVE would reject. Replies have PVE's shape:
//! `{"data": …}`, errors `{"data": null, "message": "…\n"}` (plus `"errors": {param: why}` for
//! parameter errors).
//!
//! Simplifications: privileges belong to a token as a whole (ACL paths are recorded but not used
//! to scope them); operations take effect when their task is created, the task only reports
//! `running` for the first [`FakeOptions::task_polls`] polls, except that a clone keeps the new
//! VM locked (`lock: clone`) until its task has been polled to the end, as on PVE.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::schema::{Schema, parse_bool, parse_token_header, token_header};

/// The token [`FakeOptions::default`] knows, with every privilege.
pub const DEFAULT_TOKEN_ID: &str = "root@pam!agentvm";
pub const DEFAULT_TOKEN_SECRET: &str = "5a0c2d9e-7b41-4f3a-9c6e-2d8b1f0a4e77";

/// Every privilege PVE 9.1 knows (the properties of `GET /access/roles/{roleid}`'s `returns`).
pub fn all_privileges() -> Vec<String> {
    Schema::load()
        .returns("GET", "/access/roles/Administrator")
        .and_then(|r| r.get("properties"))
        .and_then(Value::as_object)
        .expect("schema: GET /access/roles/{roleid} returns the privileges")
        .keys()
        .cloned()
        .collect()
}

#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// The node name (default `pve`).
    pub node: String,
    /// Valid API tokens: (`user@realm!name`, secret, privileges). Default: [`DEFAULT_TOKEN_ID`]
    /// with [`DEFAULT_TOKEN_SECRET`] and [`all_privileges`].
    pub tokens: Vec<(String, String, Vec<String>)>,
    /// The seeded template VM (default 9000, named [`FakeOptions::template_name`]).
    pub template_vmid: u32,
    pub template_name: String,
    /// The storage of the template's disks and the default clone target (default `local-lvm`).
    pub storage: String,
    /// How many status polls of a task answer `running` before it is `stopped` (default 1).
    pub task_polls: u32,
    /// Every task of this type (`qmclone`, `qmstart`, `qmconfig`, `resize`, `qmdestroy`, …) fails
    /// with this exit status, without its effect.
    pub fail_task: Option<(String, String)>,
    /// How many guest-agent calls after each start answer `QEMU guest agent is not running`
    /// (default 2).
    pub agent_down_calls: u32,
    /// The IPv4 address `network-get-interfaces` reports on eth0 (default 127.0.0.1).
    pub guest_ip: String,
    /// The first config update (POST/PUT config) fails with PVE's lock timeout.
    pub lock_timeout_once: bool,
    /// The first `/cluster/nextid` answer is immediately taken by another VM ("someone-else").
    pub nextid_race: bool,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            node: "pve".into(),
            tokens: vec![(
                DEFAULT_TOKEN_ID.into(),
                DEFAULT_TOKEN_SECRET.into(),
                all_privileges(),
            )],
            template_vmid: 9000,
            template_name: "nixos-template".into(),
            storage: "local-lvm".into(),
            task_polls: 1,
            fail_task: None,
            agent_down_calls: 2,
            guest_ip: "127.0.0.1".into(),
            lock_timeout_once: false,
            nextid_race: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeVm {
    pub name: String,
    /// The VM config as PVE stores it (`sshkeys` decoded, `template` = `1` on templates).
    pub config: BTreeMap<String, String>,
    pub running: bool,
    pub template: bool,
    pub pool: Option<String>,
    /// Size of the first disk (`scsi0`/`virtio0`/…).
    pub disk_size_gib: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    /// Below `/api2/json`, percent-decoded.
    pub path: String,
    /// Query and body parameters, decoded (path parameters not included).
    pub params: BTreeMap<String, String>,
    /// `user@realm!name` of a well-formed token header.
    pub token_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeTask {
    pub upid: String,
    /// `qmclone`, `qmstart`, …
    pub kind: String,
    /// The VMID (or other id) the task is about.
    pub id: String,
    /// The token that started it.
    pub user: String,
    /// `OK` or the error.
    pub exitstatus: String,
    pub log: Vec<String>,
    /// Status polls so far.
    pub polls: u32,
    /// A VM locked until the task is seen stopped.
    lock_vmid: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FakePool {
    pub comment: Option<String>,
    pub vms: BTreeSet<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeUser {
    pub comment: Option<String>,
    pub enable: bool,
    pub tokens: BTreeMap<String, FakeToken>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeToken {
    pub secret: String,
    pub privsep: bool,
    pub comment: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeAcl {
    pub path: String,
    pub roleid: String,
    /// `user`, `token` or `group`.
    pub kind: String,
    /// The user, token or group id.
    pub ugid: String,
    pub propagate: bool,
}

/// A running fake PVE; stops when dropped.
pub struct FakePve {
    inner: Arc<Inner>,
    server: Arc<tiny_http::Server>,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    port: u16,
}

struct Inner {
    schema: &'static Schema,
    state: Mutex<State>,
}

impl FakePve {
    /// Listens on 127.0.0.1 (a free port) and serves in a background thread.
    pub fn start(opts: FakeOptions) -> FakePve {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("fake PVE: bind"));
        let port = server
            .server_addr()
            .to_ip()
            .expect("fake PVE: TCP address")
            .port();
        let inner = Arc::new(Inner {
            schema: Schema::load(),
            state: Mutex::new(State::new(opts)),
        });
        let shutdown = Arc::new(AtomicBool::new(false));
        let thread = {
            let (server, inner, shutdown) = (server.clone(), inner.clone(), shutdown.clone());
            std::thread::Builder::new()
                .name("fake-pve".into())
                .spawn(move || {
                    while !shutdown.load(Ordering::SeqCst) {
                        if let Ok(request) = server.recv() {
                            inner.serve(request);
                        }
                    }
                })
                .expect("fake PVE: thread")
        };
        FakePve {
            inner,
            server,
            shutdown,
            thread: Some(thread),
            port,
        }
    }

    /// `http://127.0.0.1:PORT` (the API is below `/api2/json`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `Authorization` header value of the first configured token.
    pub fn auth_header(&self) -> String {
        let st = self.state();
        let (id, secret, _) = st.opts.tokens.first().expect("no token configured");
        token_header(id, secret)
    }

    pub fn vms(&self) -> BTreeMap<u32, FakeVm> {
        self.state().vms.clone()
    }

    /// Adds or replaces a VM (test setup).
    pub fn put_vm(&self, vmid: u32, vm: FakeVm) {
        self.state().vms.insert(vmid, vm);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// Schema violations (and requests to endpoints the fake does not implement).
    pub fn violations(&self) -> Vec<String> {
        self.state().violations.clone()
    }

    /// Calls (accepted ones too) of methods the schema calls deprecated, e.g. `PUT /pools/{poolid}`
    /// ("use 'PUT /pools/?poolid={poolid}' instead").
    pub fn deprecated_calls(&self) -> Vec<String> {
        self.state().deprecated.clone()
    }

    /// UPID → how many times its status was polled.
    pub fn tasks_polled(&self) -> BTreeMap<String, u32> {
        let st = self.state();
        st.tasks.iter().map(|(u, t)| (u.clone(), t.polls)).collect()
    }

    pub fn tasks(&self) -> BTreeMap<String, FakeTask> {
        self.state().tasks.clone()
    }

    /// Pools with their member VMs.
    pub fn pools(&self) -> BTreeMap<String, FakePool> {
        let st = self.state();
        st.pools
            .iter()
            .map(|(id, comment)| {
                let pool = FakePool {
                    comment: comment.clone(),
                    vms: st.pool_members(id),
                };
                (id.clone(), pool)
            })
            .collect()
    }

    pub fn acls(&self) -> Vec<FakeAcl> {
        self.state().acls.clone()
    }

    pub fn users(&self) -> BTreeMap<String, FakeUser> {
        self.state().users.clone()
    }

    /// Custom roles (built-in ones not included) → privileges.
    pub fn roles(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.state().roles.clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state()
    }
}

impl Drop for FakePve {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

type Params = BTreeMap<String, String>;
/// An error reply: HTTP status and message.
type Fail = (u16, String);

fn fail<T>(code: u16, message: impl Into<String>) -> Result<T, Fail> {
    Err((code, message.into()))
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn serve(&self, mut request: tiny_http::Request) {
        let method = request.method().as_str().to_ascii_uppercase();
        let url = request.url().to_string();
        let header = |name: &'static str| {
            request
                .headers()
                .iter()
                .find(|h| h.field.equiv(name))
                .map(|h| h.value.as_str().to_string())
        };
        let auth = header("Authorization");
        let content_type = header("Content-Type").unwrap_or_default();
        let mut body = Vec::new();
        let _ = request.as_reader().read_to_end(&mut body);

        let (status, reply) = self.handle(&method, &url, auth.as_deref(), &content_type, &body);
        let response = tiny_http::Response::from_string(reply.to_string())
            .with_status_code(status)
            .with_header(
                tiny_http::Header::from_bytes("Content-Type", "application/json;charset=UTF-8")
                    .unwrap(),
            );
        let _ = request.respond(response);
    }

    /// One request → (HTTP status, JSON body).
    fn handle(
        &self,
        method: &str,
        url: &str,
        auth: Option<&str>,
        content_type: &str,
        body: &[u8],
    ) -> (u16, Value) {
        let (raw_path, query) = url.split_once('?').unwrap_or((url, ""));
        let Some(api_path) = raw_path.strip_prefix("/api2/json") else {
            let msg = format!("{method} {raw_path}: not below /api2/json");
            self.state().violations.push(msg.clone());
            return error_reply(404, &msg, None);
        };
        let segments: Vec<String> = api_path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(&percent_decode(s, false)).into_owned())
            .collect();
        let path = format!("/{}", segments.join("/"));
        let params = match request_params(query, content_type, body) {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("{method} {path}: {e}");
                self.state().violations.push(msg.clone());
                return error_reply(400, &msg, None);
            }
        };
        let token = parse_token_header(auth);
        self.state().requests.push(Recorded {
            method: method.to_string(),
            path: path.clone(),
            params: params.clone(),
            token_id: token.as_ref().ok().map(|t| t.full_tokenid()),
        });

        let token = match token {
            Ok(t) => t,
            Err(e) => {
                self.state()
                    .violations
                    .push(format!("{method} {path}: Authorization header: {e}"));
                let msg = if auth.is_none() {
                    "No ticket"
                } else {
                    "authentication failure"
                };
                return error_reply(401, msg, None);
            }
        };
        if let Err(e) = self.schema.check(method, &path, &params, auth) {
            let param = regex::Regex::new(r"parameter '([^']+)'")
                .unwrap()
                .captures(&e)
                .map(|c| c[1].to_string());
            self.state().violations.push(e.clone());
            let errors = param.map(|p| json!({ p: e.clone() }));
            let message = if errors.is_some() {
                "Parameter verification failed."
            } else {
                &e
            };
            return error_reply(400, message, errors);
        }

        let mut st = self.state();
        if let Some(text) = self.schema.deprecation(method, &path) {
            st.deprecated.push(format!("{method} {path}: {text}"));
        }
        let Some(caller) = st.authenticate(&token.full_tokenid(), &token.secret) else {
            return error_reply(401, "authentication failure", None);
        };
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        match st.route(&caller, method, &segs, &params) {
            Ok(data) => (200, json!({ "data": data })),
            Err((code, message)) => {
                if code == 501 {
                    st.violations.push(format!("FakePve: {message}"));
                }
                error_reply(code, &message, None)
            }
        }
    }
}

fn error_reply(code: u16, message: &str, errors: Option<Value>) -> (u16, Value) {
    let mut body = json!({ "data": null, "message": format!("{}\n", message.trim_end()) });
    if let Some(errors) = errors {
        body["errors"] = errors;
    }
    (code, body)
}

/// Query parameters, plus the body's (form-encoded or JSON) for any method.
fn request_params(query: &str, content_type: &str, body: &[u8]) -> Result<Params, String> {
    let mut pairs = form_decode(query);
    if content_type.starts_with("application/json") {
        let value: Value = serde_json::from_slice(body).map_err(|e| format!("JSON body: {e}"))?;
        let object = value.as_object().ok_or("JSON body is not an object")?;
        for (k, v) in object {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => if *b { "1" } else { "0" }.to_string(),
                other => other.to_string(),
            };
            pairs.push((k.clone(), v));
        }
    } else if !body.is_empty() {
        let text = std::str::from_utf8(body).map_err(|_| "body is not UTF-8")?;
        pairs.extend(form_decode(text));
    }
    let mut params = Params::new();
    for (k, v) in pairs {
        if params.insert(k.clone(), v).is_some() {
            return Err(format!("parameter '{k}' given more than once"));
        }
    }
    Ok(params)
}

/// The caller of a request: its token and privileges.
struct Caller {
    token: String,
    privs: BTreeSet<String>,
}

impl Caller {
    fn has(&self, privilege: &str) -> bool {
        self.privs.contains(privilege)
    }

    fn require(&self, acl_path: &str, privilege: &str) -> Result<(), Fail> {
        if self.has(privilege) {
            Ok(())
        } else {
            fail(
                403,
                format!("Permission check failed ({acl_path}, {privilege})"),
            )
        }
    }

    fn require_any(&self, acl_path: &str, privileges: &[&str]) -> Result<(), Fail> {
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

struct State {
    opts: FakeOptions,
    vms: BTreeMap<u32, FakeVm>,
    /// Pool id → comment (members: [`FakeVm::pool`]).
    pools: BTreeMap<String, Option<String>>,
    users: BTreeMap<String, FakeUser>,
    roles: BTreeMap<String, BTreeSet<String>>,
    acls: Vec<FakeAcl>,
    tasks: BTreeMap<String, FakeTask>,
    requests: Vec<Recorded>,
    violations: Vec<String>,
    deprecated: Vec<String>,
    /// Agent calls since the VM's last start.
    agent_calls: BTreeMap<u32, u32>,
    lock_timeout_pending: bool,
    nextid_race_pending: bool,
    counter: u64,
}

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
    fn new(opts: FakeOptions) -> State {
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
            config,
            running: false,
            template: true,
            pool: None,
            disk_size_gib: 8,
        };
        State {
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
            opts,
        }
    }

    /// The caller for a token id and secret: a configured token, or one created through the API
    /// (whose privileges come from the ACLs naming it, or its user when `privsep` is off).
    fn authenticate(&self, token_id: &str, secret: &str) -> Option<Caller> {
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

    fn acl_privileges(&self, kind: &str, ugid: &str) -> BTreeSet<String> {
        self.acls
            .iter()
            .filter(|a| a.kind == kind && a.ugid == ugid)
            .flat_map(|a| self.role_privileges(&a.roleid).unwrap_or_default())
            .collect()
    }

    /// A custom or (approximated) built-in role's privileges.
    fn role_privileges(&self, roleid: &str) -> Option<BTreeSet<String>> {
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

    fn next_counter(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// The router: one arm per implemented (method, path) of the PVE API.
    fn route(
        &mut self,
        caller: &Caller,
        method: &str,
        segs: &[&str],
        p: &Params,
    ) -> Result<Value, Fail> {
        match (method, segs) {
            ("GET", ["cluster", "nextid"]) => self.nextid(p),
            ("GET", ["cluster", "resources"]) => self.resources(caller, p),
            ("GET", ["nodes", node, "qemu"]) => {
                self.check_node(node)?;
                self.list_vms(caller)
            }
            ("POST", ["nodes", node, "qemu", vmid, "clone"]) => {
                self.check_node(node)?;
                self.clone_vm(caller, vmid_of(vmid), p)
            }
            ("GET", ["nodes", node, "qemu", vmid, "config"]) => {
                self.check_node(node)?;
                self.get_config(caller, vmid_of(vmid))
            }
            ("POST" | "PUT", ["nodes", node, "qemu", vmid, "config"]) => {
                self.check_node(node)?;
                self.update_config(caller, vmid_of(vmid), p, method == "POST")
            }
            ("PUT", ["nodes", node, "qemu", vmid, "resize"]) => {
                self.check_node(node)?;
                self.resize(caller, vmid_of(vmid), p)
            }
            ("POST", ["nodes", node, "qemu", vmid, "status", action]) => {
                self.check_node(node)?;
                self.power(caller, vmid_of(vmid), action)
            }
            ("GET", ["nodes", node, "qemu", vmid, "status", "current"]) => {
                self.check_node(node)?;
                self.status_current(caller, vmid_of(vmid))
            }
            ("DELETE", ["nodes", node, "qemu", vmid]) => {
                self.check_node(node)?;
                self.destroy(caller, vmid_of(vmid))
            }
            ("POST", ["nodes", node, "qemu", vmid, "agent", "ping"]) => {
                self.check_node(node)?;
                self.agent(caller, vmid_of(vmid), "ping")
            }
            ("POST", ["nodes", node, "qemu", vmid, "agent", "shutdown"]) => {
                self.check_node(node)?;
                self.agent_shutdown(caller, vmid_of(vmid))
            }
            (
                "GET",
                [
                    "nodes",
                    node,
                    "qemu",
                    vmid,
                    "agent",
                    "network-get-interfaces",
                ],
            ) => {
                self.check_node(node)?;
                self.agent(caller, vmid_of(vmid), "network-get-interfaces")
            }
            ("GET", ["nodes", node, "tasks", upid, "status"]) => {
                self.check_node(node)?;
                self.task_status(caller, upid)
            }
            ("GET", ["nodes", node, "tasks", upid, "log"]) => {
                self.check_node(node)?;
                self.task_log(caller, upid, p)
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
            _ => fail(
                501,
                format!("Method '{method} /{}' not implemented", segs.join("/")),
            ),
        }
    }

    // ----- helpers -----

    fn check_node(&self, node: &str) -> Result<(), Fail> {
        if node == self.opts.node {
            Ok(())
        } else {
            fail(
                500,
                format!(
                    "hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known"
                ),
            )
        }
    }

    fn vm(&self, vmid: u32) -> Result<&FakeVm, Fail> {
        self.vms.get(&vmid).ok_or_else(|| {
            (
                500,
                format!(
                    "Configuration file 'nodes/{}/qemu-server/{vmid}.conf' does not exist",
                    self.opts.node
                ),
            )
        })
    }

    /// PVE's check_lock: a locked VM refuses changes unless `skiplock` is set.
    fn check_unlocked(&self, vmid: u32, p: &Params) -> Result<(), Fail> {
        let skiplock = p.get("skiplock").and_then(|v| parse_bool(v)) == Some(true);
        match self.vm(vmid)?.config.get("lock") {
            Some(lock) if !skiplock => fail(500, format!("VM is locked ({lock})")),
            _ => Ok(()),
        }
    }

    fn pool_members(&self, poolid: &str) -> BTreeSet<u32> {
        self.vms
            .iter()
            .filter(|(_, vm)| vm.pool.as_deref() == Some(poolid))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Creates a task; unless [`FakeOptions::fail_task`] names its type, `work` runs now and its
    /// error (if any) becomes the task's exit status, as a failing PVE worker's would.
    fn start_task(
        &mut self,
        kind: &str,
        id: &str,
        user: &str,
        work: impl FnOnce(&mut State) -> Result<Vec<String>, String>,
    ) -> String {
        let n = self.next_counter();
        let now = unix_now();
        let upid = format!(
            "UPID:{}:{:08X}:{:08X}:{:08X}:{kind}:{id}:{user}:",
            self.opts.node,
            0x1000 + n,
            0x0010_0000 + n * 100,
            now
        );
        let mut log = Vec::new();
        let exitstatus = match &self.opts.fail_task {
            Some((k, status)) if k == kind => {
                log.push(status.clone());
                status.clone()
            }
            _ => match work(self) {
                Ok(lines) => {
                    log.extend(lines);
                    "OK".to_string()
                }
                Err(e) => {
                    log.push(e.clone());
                    e
                }
            },
        };
        let lock_vmid = (kind == "qmclone" && exitstatus == "OK")
            .then(|| id.parse::<u32>().ok())
            .flatten();
        let task = FakeTask {
            upid: upid.clone(),
            kind: kind.to_string(),
            id: id.to_string(),
            user: user.to_string(),
            exitstatus,
            log,
            polls: 0,
            lock_vmid,
        };
        self.tasks.insert(upid.clone(), task);
        upid
    }

    fn task(&self, upid: &str) -> Result<&FakeTask, Fail> {
        if !upid.starts_with("UPID:") {
            return fail(400, format!("unable to parse worker upid '{upid}'"));
        }
        self.tasks
            .get(upid)
            .ok_or_else(|| (500, format!("no such task '{upid}'")))
    }

    // ----- cluster -----

    fn nextid(&mut self, p: &Params) -> Result<Value, Fail> {
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
            self.vms.insert(
                id,
                FakeVm {
                    name: "someone-else".into(),
                    config,
                    running: false,
                    template: false,
                    pool: None,
                    disk_size_gib: 0,
                },
            );
        }
        // PVE declares an integer but sends the id as a JSON string.
        Ok(json!(id.to_string()))
    }

    fn resources(&self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        let kind = p.get("type").map(String::as_str);
        let node = &self.opts.node;
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
                    "name": vm.name,
                    "node": node,
                    "status": if vm.running { "running" } else { "stopped" },
                    "template": u8::from(vm.template),
                    "maxcpu": vm.cores(),
                    "maxmem": vm.memory_mib() * 1024 * 1024,
                    "maxdisk": vm.disk_size_gib * 1024 * 1024 * 1024,
                    "uptime": if vm.running { 42 } else { 0 },
                });
                if let Some(pool) = &vm.pool {
                    r["pool"] = json!(pool);
                }
                if let Some(lock) = vm.config.get("lock") {
                    r["lock"] = json!(lock);
                }
                out.push(r);
            }
        }
        if kind.is_none() || kind == Some("node") {
            out.push(json!({
                "id": format!("node/{node}"), "type": "node", "node": node, "status": "online",
                "maxcpu": 2, "maxmem": 24u64 << 30, "uptime": 1000,
            }));
        }
        if kind.is_none() || kind == Some("storage") {
            let storage = &self.opts.storage;
            out.push(json!({
                "id": format!("storage/{node}/{storage}"), "type": "storage", "node": node,
                "storage": storage, "status": "available", "plugintype": "lvmthin",
                "content": "images,rootdir", "shared": 0,
            }));
        }
        Ok(Value::Array(out))
    }

    // ----- VMs -----

    fn list_vms(&self, caller: &Caller) -> Result<Value, Fail> {
        if !caller.has("VM.Audit") {
            return Ok(json!([]));
        }
        let list = self
            .vms
            .iter()
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

    fn clone_vm(&mut self, caller: &Caller, vmid: u32, p: &Params) -> Result<Value, Fail> {
        let newid = vmid_of(&p["newid"]);
        caller.require(&format!("/vms/{vmid}"), "VM.Clone")?;
        match p.get("pool") {
            Some(pool) => caller.require(&format!("/pool/{pool}"), "VM.Allocate")?,
            None => caller.require(&format!("/vms/{newid}"), "VM.Allocate")?,
        }
        let source = self.vm(vmid)?.clone();
        if let Some(target) = p.get("target") {
            self.check_node(target)?;
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
        let upid = self.start_task("qmclone", &newid.to_string(), &caller.token, |st| {
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
                name,
                config,
                running: false,
                template: false,
                pool,
                disk_size_gib: source.disk_size_gib,
            };
            st.vms.insert(newid, vm);
            Ok(vec![format!(
                "create {} clone of drive scsi0",
                if full { "full" } else { "linked" }
            )])
        });
        Ok(json!(upid))
    }

    fn get_config(&self, caller: &Caller, vmid: u32) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.Audit")?;
        let vm = self.vm(vmid)?;
        let schema = Schema::load();
        let types = schema
            .returns(
                "GET",
                &format!("/nodes/{}/qemu/{vmid}/config", self.opts.node),
            )
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

    fn update_config(
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
    fn resize(&mut self, caller: &Caller, vmid: u32, p: &Params) -> Result<Value, Fail> {
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

    fn power(&mut self, caller: &Caller, vmid: u32, action: &str) -> Result<Value, Fail> {
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
            Ok(vec![])
        });
        Ok(json!(upid))
    }

    fn status_current(&self, caller: &Caller, vmid: u32) -> Result<Value, Fail> {
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

    fn destroy(&mut self, caller: &Caller, vmid: u32) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.Allocate")?;
        if self.vm(vmid)?.running {
            return fail(500, format!("VM {vmid} is running - destroy failed"));
        }
        self.check_unlocked(vmid, &Params::new())?;
        let upid = self.start_task("qmdestroy", &vmid.to_string(), &caller.token, |st| {
            st.vms.remove(&vmid);
            st.agent_calls.remove(&vmid);
            Ok(vec![format!("destroyed VM {vmid}")])
        });
        Ok(json!(upid))
    }

    fn agent(&mut self, caller: &Caller, vmid: u32, command: &str) -> Result<Value, Fail> {
        caller.require_any(
            &format!("/vms/{vmid}"),
            &["VM.GuestAgent.Audit", "VM.GuestAgent.Unrestricted"],
        )?;
        let vm = self.vm(vmid)?;
        if !vm.agent_enabled() {
            return fail(500, "No QEMU guest agent configured");
        }
        if !vm.running {
            return fail(500, format!("VM {vmid} is not running"));
        }
        let calls = self.agent_calls.entry(vmid).or_insert(0);
        *calls += 1;
        if *calls <= self.opts.agent_down_calls {
            return fail(500, "QEMU guest agent is not running");
        }
        Ok(match command {
            "ping" => json!({ "result": {} }),
            _ => json!({ "result": [
                { "name": "lo", "ip-addresses": [
                    { "ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8 },
                ]},
                { "name": "eth0", "hardware-address": mac_for(vmid).to_ascii_lowercase(), "ip-addresses": [
                    { "ip-address": self.opts.guest_ip, "ip-address-type": "ipv4", "prefix": 24 },
                    { "ip-address": "fe80::1", "ip-address-type": "ipv6", "prefix": 64 },
                ]},
            ]}),
        })
    }

    /// `agent/shutdown`: the guest powers off once its agent answers.
    fn agent_shutdown(&mut self, caller: &Caller, vmid: u32) -> Result<Value, Fail> {
        caller.require_any(
            &format!("/vms/{vmid}"),
            &["VM.PowerMgmt", "VM.GuestAgent.Unrestricted"],
        )?;
        let vm = self.vm(vmid)?;
        if !vm.agent_enabled() {
            return fail(500, "No QEMU guest agent configured");
        }
        if !vm.running {
            return fail(500, format!("VM {vmid} is not running"));
        }
        let calls = self.agent_calls.entry(vmid).or_insert(0);
        *calls += 1;
        if *calls <= self.opts.agent_down_calls {
            return fail(500, "QEMU guest agent is not running");
        }
        if let Some(vm) = self.vms.get_mut(&vmid) {
            vm.running = false;
        }
        Ok(json!({ "result": {} }))
    }

    // ----- tasks -----

    fn task_status(&mut self, caller: &Caller, upid: &str) -> Result<Value, Fail> {
        let task = self.task(upid)?;
        if task.user != caller.token {
            caller.require(&format!("/nodes/{}", self.opts.node), "Sys.Audit")?;
        }
        let task = self.tasks.get_mut(upid).unwrap();
        task.polls += 1;
        let running = task.polls <= self.opts.task_polls;
        let fields: Vec<&str> = upid.split(':').collect();
        let hex =
            |i: usize| i64::from_str_radix(fields.get(i).copied().unwrap_or("0"), 16).unwrap_or(0);
        let mut r = json!({
            "upid": upid,
            "node": fields.get(1),
            "pid": hex(2),
            "pstart": hex(3),
            "starttime": hex(4),
            "type": task.kind,
            "id": task.id,
            "user": task.user,
            "status": if running { "running" } else { "stopped" },
        });
        if !running {
            r["exitstatus"] = json!(task.exitstatus);
            if let Some(vmid) = task.lock_vmid.take()
                && let Some(vm) = self.vms.get_mut(&vmid)
            {
                vm.config.remove("lock");
            }
        }
        Ok(r)
    }

    fn task_log(&self, caller: &Caller, upid: &str, p: &Params) -> Result<Value, Fail> {
        let task = self.task(upid)?;
        if task.user != caller.token {
            caller.require(&format!("/nodes/{}", self.opts.node), "Sys.Audit")?;
        }
        let mut lines = task.log.clone();
        if task.polls > self.opts.task_polls {
            lines.push(if task.exitstatus == "OK" {
                "TASK OK".to_string()
            } else {
                format!("TASK ERROR: {}", task.exitstatus)
            });
        }
        let start: usize = p.get("start").and_then(|s| s.parse().ok()).unwrap_or(0);
        let limit: usize = p.get("limit").and_then(|s| s.parse().ok()).unwrap_or(50);
        let out: Vec<Value> = lines
            .iter()
            .enumerate()
            .skip(start)
            .take(limit)
            .map(|(i, t)| json!({ "n": i + 1, "t": t }))
            .collect();
        Ok(Value::Array(out))
    }

    // ----- pools -----

    fn pool_json(&self, poolid: &str, with_members: bool) -> Value {
        let mut r = json!({ "poolid": poolid });
        if let Some(Some(comment)) = self.pools.get(poolid) {
            r["comment"] = json!(comment);
        }
        if with_members {
            let members: Vec<Value> = self
                .pool_members(poolid)
                .iter()
                .map(|vmid| {
                    let vm = &self.vms[vmid];
                    json!({
                        "id": format!("qemu/{vmid}"), "type": "qemu", "vmid": vmid,
                        "node": self.opts.node, "name": vm.name,
                        "status": if vm.running { "running" } else { "stopped" },
                        "template": u8::from(vm.template),
                    })
                })
                .collect();
            r["members"] = Value::Array(members);
        }
        r
    }

    fn list_pools(&self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        if !caller.has("Pool.Audit") {
            return Ok(json!([]));
        }
        if let Some(poolid) = p.get("poolid") {
            if !self.pools.contains_key(poolid) {
                return fail(500, format!("pool '{poolid}' does not exist"));
            }
            return Ok(json!([self.pool_json(poolid, true)]));
        }
        Ok(Value::Array(
            self.pools
                .keys()
                .map(|id| self.pool_json(id, false))
                .collect(),
        ))
    }

    fn get_pool(&self, caller: &Caller, poolid: &str) -> Result<Value, Fail> {
        caller.require(&format!("/pool/{poolid}"), "Pool.Audit")?;
        if !self.pools.contains_key(poolid) {
            return fail(500, format!("pool '{poolid}' does not exist"));
        }
        let mut r = self.pool_json(poolid, true);
        r.as_object_mut().unwrap().remove("poolid");
        Ok(r)
    }

    fn create_pool(&mut self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        let poolid = &p["poolid"];
        caller.require(&format!("/pool/{poolid}"), "Pool.Allocate")?;
        if self.pools.contains_key(poolid) {
            return fail(500, format!("pool '{poolid}' already exists"));
        }
        self.pools.insert(poolid.clone(), p.get("comment").cloned());
        Ok(Value::Null)
    }

    fn update_pool(&mut self, caller: &Caller, poolid: &str, p: &Params) -> Result<Value, Fail> {
        caller.require(&format!("/pool/{poolid}"), "Pool.Allocate")?;
        if !self.pools.contains_key(poolid) {
            return fail(500, format!("pool '{poolid}' does not exist"));
        }
        let delete = p.get("delete").and_then(|v| parse_bool(v)) == Some(true);
        let allow_move = p.get("allow-move").and_then(|v| parse_bool(v)) == Some(true);
        let vmids: Vec<u32> = p
            .get("vms")
            .map(|v| {
                v.split([',', ';', ' '])
                    .filter(|s| !s.is_empty())
                    .map(vmid_of)
                    .collect()
            })
            .unwrap_or_default();
        for vmid in &vmids {
            let Some(vm) = self.vms.get(vmid) else {
                return fail(500, format!("VM {vmid} does not exist"));
            };
            match (&vm.pool, delete) {
                (Some(other), false) if other != poolid && !allow_move => {
                    return fail(500, format!("VM {vmid} is already a pool member"));
                }
                (pool, true) if pool.as_deref() != Some(poolid) => {
                    return fail(500, format!("VM {vmid} is not a pool member"));
                }
                _ => {}
            }
        }
        for vmid in vmids {
            self.vms.get_mut(&vmid).unwrap().pool = (!delete).then(|| poolid.to_string());
        }
        if let Some(comment) = p.get("comment") {
            self.pools.insert(poolid.to_string(), Some(comment.clone()));
        }
        Ok(Value::Null)
    }

    fn delete_pool(&mut self, caller: &Caller, poolid: &str) -> Result<Value, Fail> {
        caller.require(&format!("/pool/{poolid}"), "Pool.Allocate")?;
        if !self.pools.contains_key(poolid) {
            return fail(500, format!("pool '{poolid}' does not exist"));
        }
        if !self.pool_members(poolid).is_empty() {
            return fail(500, format!("pool '{poolid}' is not empty"));
        }
        self.pools.remove(poolid);
        Ok(Value::Null)
    }

    // ----- users, tokens, roles, ACLs -----

    fn list_users(&self, caller: &Caller) -> Result<Value, Fail> {
        if !caller.has("Sys.Audit") && !caller.has("User.Modify") {
            return Ok(json!([]));
        }
        let list = self
            .users
            .iter()
            .map(|(id, u)| {
                let mut r = json!({ "userid": id, "enable": u8::from(u.enable) });
                if let Some(c) = &u.comment {
                    r["comment"] = json!(c);
                }
                r
            })
            .collect();
        Ok(Value::Array(list))
    }

    fn create_user(&mut self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        let userid = &p["userid"];
        let realm = userid.rsplit_once('@').map_or("", |(_, r)| r);
        caller.require(&format!("/access/realm/{realm}"), "Realm.AllocateUser")?;
        if self.users.contains_key(userid) {
            return fail(
                500,
                format!("create user failed: user '{userid}' already exists"),
            );
        }
        let user = FakeUser {
            comment: p.get("comment").cloned(),
            enable: p.get("enable").and_then(|v| parse_bool(v)).unwrap_or(true),
            tokens: BTreeMap::new(),
        };
        self.users.insert(userid.clone(), user);
        Ok(Value::Null)
    }

    fn create_token(
        &mut self,
        caller: &Caller,
        userid: &str,
        tokenid: &str,
        p: &Params,
    ) -> Result<Value, Fail> {
        caller.require(&format!("/access/users/{userid}"), "User.Modify")?;
        let n = self.next_counter();
        let Some(user) = self.users.get_mut(userid) else {
            return fail(500, format!("no such user ('{userid}')"));
        };
        if user.tokens.contains_key(tokenid) {
            return fail(500, "Token already exists.");
        }
        let token = FakeToken {
            secret: fake_uuid(n),
            privsep: p.get("privsep").and_then(|v| parse_bool(v)).unwrap_or(true),
            comment: p.get("comment").cloned(),
        };
        let reply = json!({
            "full-tokenid": format!("{userid}!{tokenid}"),
            "info": token_info(&token),
            "value": token.secret,
        });
        user.tokens.insert(tokenid.to_string(), token);
        Ok(reply)
    }

    fn get_token(&self, caller: &Caller, userid: &str, tokenid: &str) -> Result<Value, Fail> {
        caller.require(&format!("/access/users/{userid}"), "User.Modify")?;
        let token = self
            .users
            .get(userid)
            .and_then(|u| u.tokens.get(tokenid))
            .ok_or_else(|| {
                (
                    500,
                    format!("no such token '{tokenid}' for user '{userid}'"),
                )
            })?;
        Ok(token_info(token))
    }

    fn delete_token(
        &mut self,
        caller: &Caller,
        userid: &str,
        tokenid: &str,
    ) -> Result<Value, Fail> {
        caller.require(&format!("/access/users/{userid}"), "User.Modify")?;
        let full = format!("{userid}!{tokenid}");
        self.users
            .get_mut(userid)
            .and_then(|u| u.tokens.remove(tokenid))
            .ok_or_else(|| {
                (
                    500,
                    format!("no such token '{tokenid}' for user '{userid}'"),
                )
            })?;
        self.acls.retain(|a| !(a.kind == "token" && a.ugid == full));
        Ok(Value::Null)
    }

    fn list_acls(&self, caller: &Caller) -> Result<Value, Fail> {
        if !caller.has("Permissions.Modify") && !caller.has("Sys.Audit") {
            return Ok(json!([]));
        }
        let list = self
            .acls
            .iter()
            .map(|a| {
                json!({ "path": a.path, "roleid": a.roleid, "type": a.kind, "ugid": a.ugid,
                        "propagate": u8::from(a.propagate) })
            })
            .collect();
        Ok(Value::Array(list))
    }

    fn update_acl(&mut self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        let path = &p["path"];
        caller.require(path, "Permissions.Modify")?;
        let acl_path = regex::Regex::new(
            r"^/(?:|vms(?:/\d+)?|pool(?:/[A-Za-z0-9_\-]+)*|storage(?:/[A-Za-z0-9_\-]+)?|nodes(?:/[A-Za-z0-9\-]+)?|access(?:/.*)?|sdn(?:/.*)?|mapping(?:/.*)?)$",
        )
        .unwrap();
        if !acl_path.is_match(path) {
            return fail(400, format!("invalid ACL path '{path}'"));
        }
        let list = |key: &str| -> Vec<String> {
            p.get(key)
                .map(|v| {
                    v.split([',', ';', ' '])
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let roles = list("roles");
        for role in &roles {
            if self.role_privileges(role).is_none() {
                return fail(500, format!("role '{role}' does not exist"));
            }
        }
        let mut subjects = Vec::new();
        for user in list("users") {
            let known = self.users.contains_key(&user)
                || self
                    .opts
                    .tokens
                    .iter()
                    .any(|(id, _, _)| id.starts_with(&format!("{user}!")));
            if !known {
                return fail(500, format!("user '{user}' does not exist"));
            }
            subjects.push(("user", user));
        }
        for token in list("tokens") {
            let known = self.opts.tokens.iter().any(|(id, _, _)| *id == token)
                || token
                    .split_once('!')
                    .and_then(|(u, t)| self.users.get(u)?.tokens.get(t))
                    .is_some();
            if !known {
                return fail(500, format!("no such token '{token}'"));
            }
            subjects.push(("token", token));
        }
        for group in list("groups") {
            subjects.push(("group", group));
        }
        let delete = p.get("delete").and_then(|v| parse_bool(v)) == Some(true);
        let propagate = p
            .get("propagate")
            .and_then(|v| parse_bool(v))
            .unwrap_or(true);
        for (kind, ugid) in subjects {
            for role in &roles {
                self.acls.retain(|a| {
                    !(a.path == *path && a.kind == kind && a.ugid == ugid && a.roleid == *role)
                });
                if !delete {
                    self.acls.push(FakeAcl {
                        path: path.clone(),
                        roleid: role.clone(),
                        kind: kind.to_string(),
                        ugid: ugid.clone(),
                        propagate,
                    });
                }
            }
        }
        Ok(Value::Null)
    }

    fn list_roles(&self) -> Result<Value, Fail> {
        let builtin = [
            "Administrator",
            "NoAccess",
            "PVEAdmin",
            "PVEAuditor",
            "PVEVMAdmin",
            "PVEVMUser",
            "PVETemplateUser",
            "PVEPoolAdmin",
            "PVEPoolUser",
            "PVEUserAdmin",
            "PVEDatastoreAdmin",
            "PVEDatastoreUser",
            "PVESDNUser",
        ];
        let mut out: Vec<Value> = builtin
            .iter()
            .map(|r| {
                let privs: Vec<String> = self.role_privileges(r).unwrap().into_iter().collect();
                json!({ "roleid": r, "privs": privs.join(","), "special": 1 })
            })
            .collect();
        for (r, privs) in &self.roles {
            let privs: Vec<&str> = privs.iter().map(String::as_str).collect();
            out.push(json!({ "roleid": r, "privs": privs.join(","), "special": 0 }));
        }
        Ok(Value::Array(out))
    }

    fn parse_privs(p: &Params) -> Result<BTreeSet<String>, Fail> {
        let all = all_privileges();
        let mut out = BTreeSet::new();
        for privilege in p
            .get("privs")
            .map(String::as_str)
            .unwrap_or("")
            .split([',', ';', ' '])
            .filter(|s| !s.is_empty())
        {
            if !all.iter().any(|a| a == privilege) {
                return fail(500, format!("invalid privilege '{privilege}'"));
            }
            out.insert(privilege.to_string());
        }
        Ok(out)
    }

    fn create_role(&mut self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        caller.require("/access", "Sys.Modify")?;
        let roleid = &p["roleid"];
        if self.role_privileges(roleid).is_some() {
            return fail(500, format!("role '{roleid}' already exists"));
        }
        let privs = Self::parse_privs(p)?;
        self.roles.insert(roleid.clone(), privs);
        Ok(Value::Null)
    }

    fn update_role(&mut self, caller: &Caller, roleid: &str, p: &Params) -> Result<Value, Fail> {
        caller.require("/access", "Sys.Modify")?;
        let privs = Self::parse_privs(p)?;
        let append = p.get("append").and_then(|v| parse_bool(v)) == Some(true);
        let Some(role) = self.roles.get_mut(roleid) else {
            return fail(500, format!("role '{roleid}' does not exist"));
        };
        if !append {
            role.clear();
        }
        role.extend(privs);
        Ok(Value::Null)
    }
}

impl FakeVm {
    fn cores(&self) -> u64 {
        self.config
            .get("cores")
            .and_then(|c| c.parse().ok())
            .unwrap_or(1)
    }

    fn memory_mib(&self) -> u64 {
        self.config
            .get("memory")
            .map(|m| m.trim_start_matches("current="))
            .and_then(|m| m.split(',').next()?.parse().ok())
            .unwrap_or(512)
    }

    fn agent_enabled(&self) -> bool {
        self.config.get("agent").is_some_and(|a| {
            let first = a.split(',').next().unwrap_or("");
            parse_bool(first.trim_start_matches("enabled=")) == Some(true)
        })
    }

    /// A stable digest of the config, 40 hex digits like PVE's SHA-1.
    fn digest(&self) -> String {
        let mut out = String::new();
        for seed in 0..3u8 {
            let mut h = DefaultHasher::new();
            seed.hash(&mut h);
            self.config.hash(&mut h);
            out.push_str(&format!("{:016x}", h.finish()));
        }
        out.truncate(40);
        out
    }
}

fn token_info(token: &FakeToken) -> Value {
    let mut info = json!({ "privsep": u8::from(token.privsep), "expire": 0 });
    if let Some(c) = &token.comment {
        info["comment"] = json!(c);
    }
    info
}

/// The privilege PVE requires to set or delete one config option (qemu-server's
/// check_vm_modify_config_perm, simplified).
fn config_privilege(key: &str) -> &'static str {
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

fn is_disk_key(key: &str) -> bool {
    let base = key.trim_end_matches(|c: char| c.is_ascii_digit());
    base != key
        && matches!(
            base,
            "ide" | "sata" | "scsi" | "virtio" | "efidisk" | "tpmstate"
        )
}

/// A drive of VM `old` as it is in clone `new`: linked clones keep the base image as backing
/// (`storage:base-9000-disk-0/vm-101-disk-0`), full clones get a fresh volume on `full_storage`.
fn clone_disk(drive: &str, old: u32, new: u32, full_storage: Option<&str>) -> String {
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

fn drive_size_gib(drive: &str) -> Option<f64> {
    let caps = regex::Regex::new(r"size=([0-9.]+[KMGT]?)")
        .unwrap()
        .captures(drive)?;
    size_gib(&caps[1])
}

/// `10`, `512M`, `8G`, `1.5T` → GiB (plain numbers are bytes, as in PVE).
fn size_gib(size: &str) -> Option<f64> {
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

fn vmid_of(s: &str) -> u32 {
    s.parse().expect("vmid checked by the schema")
}

fn mac_for(vmid: u32) -> String {
    let b = vmid.to_be_bytes();
    format!("BC:24:11:{:02X}:{:02X}:{:02X}", b[1], b[2], b[3])
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random-looking UUID (v4 layout) for token secrets.
fn fake_uuid(n: u64) -> String {
    let mut h = DefaultHasher::new();
    (n, SystemTime::now()).hash(&mut h);
    let a = h.finish();
    a.hash(&mut h);
    let b = h.finish();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

// ----- URL encoding -----

/// Decodes `%XX` escapes (and, when `plus_is_space`, `+` as a space).
pub fn percent_decode(s: &str, plus_is_space: bool) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Percent-encodes everything but RFC 3986's unreserved characters (so a space is `%20`).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `application/x-www-form-urlencoded` pairs.
pub fn form_decode(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let d = |x: &str| String::from_utf8_lossy(&percent_decode(x, true)).into_owned();
            (d(k), d(v))
        })
        .collect()
}

pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

// ----- a tiny HTTP client for tests -----

/// One request to a fake PVE: `params` go in the query for GET/DELETE and in a form body for
/// POST/PUT. Returns the HTTP status and the JSON body.
pub fn raw_call(
    base_url: &str,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    auth: Option<&str>,
) -> (u16, Value) {
    let addr = base_url
        .strip_prefix("http://")
        .expect("raw_call: http:// URL");
    let encoded = form_encode(params);
    let (target, body) = match method {
        "GET" | "DELETE" if !encoded.is_empty() => {
            (format!("/api2/json{path}?{encoded}"), String::new())
        }
        "GET" | "DELETE" => (format!("/api2/json{path}"), String::new()),
        _ => (format!("/api2/json{path}"), encoded),
    };
    let mut stream = TcpStream::connect(addr).expect("raw_call: connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    if let Some(auth) = auth {
        head.push_str(&format!("Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("raw_call: read");
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .expect("raw_call: HTTP response");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("raw_call: status line");
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, json)
}
