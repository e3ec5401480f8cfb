//! A fake Proxmox VE API server for tests: plain HTTP on 127.0.0.1, a cluster of nodes, QEMU VMs
//! cloned from a template or created from uploaded images, snapshots, tasks, the guest agent
//! (files, commands run on this host), storages and uploads, pools, users, API tokens and ACLs.
//! Each request is served on its own thread.
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
//!
//! [`FakePve::fail_next`] and [`FakePve::lose_next_reply`] replace the reply to one request with
//! any status and body, before or after carrying it out.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};

use super::guest::{Guest, GuestFs};
use super::http::{form_decode, percent_decode};
use super::model::{
    FakeAcl, FakeNode, FakeOptions, FakePool, FakeTask, FakeUser, FakeVm, Recorded,
};
use super::schema::Schema;
use super::state::{Fail, Fault, PARAM_ERROR, Params, State};
use super::storage::parse_multipart;
use super::syntax::{parse_token_header, token_header};

/// pve-http-server's limit for a request body other than an upload.
const MAX_POST: usize = 512 * 1024;

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
                            // One thread per request: a slow one (a hung agent, an upload)
                            // holds up no other.
                            let inner = inner.clone();
                            let _ = std::thread::Builder::new()
                                .name("fake-pve-request".into())
                                .spawn(move || inner.serve(request));
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

    /// Adds or replaces a VM (test setup); an empty [`FakeVm::node`] means the first node. A
    /// new VM gets a fresh guest (see [`FakePve::guest_file`]).
    pub fn put_vm(&self, vmid: u32, mut vm: FakeVm) {
        let mut st = self.state();
        if vm.node.is_empty() {
            vm.node = st.nodes[0].name.clone();
        }
        st.guests
            .entry(vmid)
            .or_insert_with(|| Guest::new(vmid, &vm.name));
        st.vms.insert(vmid, vm);
    }

    /// The cluster's nodes.
    pub fn nodes(&self) -> Vec<FakeNode> {
        self.state().nodes.clone()
    }

    /// Moves a VM to another node, as a finished migration would.
    pub fn migrate(&self, vmid: u32, node: &str) {
        let mut st = self.state();
        assert!(
            st.nodes.iter().any(|n| n.name == node),
            "FakePve::migrate: no node {node}"
        );
        st.vms
            .get_mut(&vmid)
            .unwrap_or_else(|| panic!("FakePve::migrate: no VM {vmid}"))
            .node = node.to_string();
    }

    /// Takes a node off the cluster network (requests to it fail like pveproxy's proxying, its
    /// VMs show `status: unknown`) or brings it back.
    pub fn set_node_online(&self, node: &str, online: bool) {
        let mut st = self.state();
        st.nodes
            .iter_mut()
            .find(|n| n.name == node)
            .unwrap_or_else(|| panic!("FakePve::set_node_online: no node {node}"))
            .online = online;
    }

    /// From now on every guest-agent command of the VM (once PVE's checks pass) waits `hang`
    /// and then fails as PVE reports a QGA timeout: `VM {vmid} qga command 'guest-exec' failed
    /// - got timeout`. Other requests are served meanwhile. `Duration::ZERO` ends the hang.
    pub fn hang_agent(&self, vmid: u32, hang: Duration) {
        self.state().guest(vmid).hang = (!hang.is_zero()).then_some(hang);
    }

    /// A file of the VM's guest.
    pub fn guest_file(&self, vmid: u32, path: &str) -> Option<Vec<u8>> {
        self.state().guests.get(&vmid)?.fs.files.get(path).cloned()
    }

    /// Puts a file into the VM's guest, creating the folders above it.
    pub fn put_guest_file(&self, vmid: u32, path: &str, bytes: &[u8]) {
        let mut st = self.state();
        let fs = &mut st.guest(vmid).fs;
        fs.mkdir_p(&GuestFs::parent(path));
        fs.files.insert(path.to_string(), bytes.to_vec());
    }

    /// Removes a folder of the VM's guest with all below it (e.g. `/etc/agentvm`).
    pub fn remove_guest_dir(&self, vmid: u32, dir: &str) {
        self.state().guest(vmid).fs.remove_dir(dir);
    }

    /// The addresses the VM's agent reports on eth0 (beside loopback and `fe80::1`); the
    /// default is [`FakeOptions::guest_ip`].
    pub fn set_guest_ips(&self, vmid: u32, ips: Vec<String>) {
        self.state().guest(vmid).ips = Some(ips);
    }

    /// The bytes of a stored volume (an upload: `local:import/disk.qcow2`), on any node.
    pub fn volume(&self, volid: &str) -> Option<Vec<u8>> {
        let st = self.state();
        st.volumes
            .iter()
            .find(|((_, v), _)| v == volid)
            .map(|(_, v)| v.data.clone())
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

    /// The next `method path` request (`path` below `/api2/json`) that passes the schema check
    /// and authentication is not carried out: it is answered with `status` and `body` as they
    /// are, e.g. a proxy's HTML error page, or JSON PVE would not send.
    pub fn fail_next(&self, method: &str, path: &str, status: u16, body: &str) {
        self.add_fault(method, path, status, body, false);
    }

    /// Like [`FakePve::fail_next`], but the request is carried out first, and a task it starts
    /// has ended (unlocking a clone): its reply is lost on the way, as when a proxy times out
    /// while PVE does the work.
    pub fn lose_next_reply(&self, method: &str, path: &str, status: u16, body: &str) {
        self.add_fault(method, path, status, body, true);
    }

    fn add_fault(&self, method: &str, path: &str, status: u16, body: &str, carried_out: bool) {
        self.state().faults.push(Fault {
            method: method.to_ascii_uppercase(),
            path: path.to_string(),
            status,
            body: body.to_string(),
            carried_out,
        });
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
        let chunked =
            header("Transfer-Encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        let mut body = Vec::new();
        let _ = request.as_reader().read_to_end(&mut body);

        let (status, reply) = if chunked {
            // pve-http-server refuses it before anything else.
            let msg = format!("{method} {url}: chunked transfer encoding not supported (by PVE)");
            self.state().violations.push(msg);
            error_reply(501, "chunked transfer encoding not supported", None)
        } else {
            let request = HttpRequest {
                method: &method,
                url: &url,
                auth: auth.as_deref(),
                content_type: &content_type,
                body: &body,
            };
            self.handle(&request)
        };
        let (text, content_type) = match reply {
            Body::Json(value) => (value.to_string(), "application/json;charset=UTF-8"),
            Body::Raw(text) if serde_json::from_str::<Value>(&text).is_ok() => {
                (text, "application/json;charset=UTF-8")
            }
            Body::Raw(text) => (text, "text/html;charset=UTF-8"),
            Body::Proxy(reason) => {
                // A status tiny_http has no reason phrase for: written as pveproxy sends it.
                let mut w = request.into_writer();
                let _ = write!(
                    w,
                    "HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = w.flush();
                return;
            }
        };
        let response = tiny_http::Response::from_string(text)
            .with_status_code(status)
            .with_header(tiny_http::Header::from_bytes("Content-Type", content_type).unwrap());
        let _ = request.respond(response);
    }

    /// One request → (HTTP status, body).
    fn handle(&self, req: &HttpRequest) -> (u16, Body) {
        let method = req.method;
        let (raw_path, query) = req.url.split_once('?').unwrap_or((req.url, ""));
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
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let upload = method == "POST" && matches!(segs[..], ["nodes", _, "storage", _, "upload"]);
        let upload_data;
        let params = match request_params(query, req.content_type, req.body, upload) {
            Ok((p, data)) => {
                upload_data = data;
                p
            }
            Err((code, e)) => {
                let msg = format!("{method} {path}: {e}");
                self.state().violations.push(msg);
                return error_reply(code, &e, None);
            }
        };
        let token = parse_token_header(req.auth);
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
                let msg = if req.auth.is_none() {
                    "No ticket"
                } else {
                    "authentication failure"
                };
                return error_reply(401, msg, None);
            }
        };
        if let Err(e) = self.schema.check(method, &path, &params, req.auth) {
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
        let params = self.schema.normalize(method, &path, params);

        let mut st = self.state();
        if let Some(text) = self.schema.deprecation(method, &path) {
            st.deprecated.push(format!("{method} {path}: {text}"));
        }
        let Some(caller) = st.authenticate(&token.full_tokenid(), &token.secret) else {
            return error_reply(401, "authentication failure", None);
        };
        let fault = st.take_fault(method, &path);
        if let Some(fault) = &fault
            && !fault.carried_out
        {
            return (fault.status, Body::Raw(fault.body.clone()));
        }
        let tasks_before: BTreeSet<String> = st.tasks.keys().cloned().collect();
        st.upload_data = upload_data;
        st.sleep = None;
        let reply = match st.route(&caller, method, &segs, &params) {
            Ok(data) => (200, Body::Json(json!({ "data": data }))),
            Err((595, reason)) => (595, Body::Proxy(reason)),
            Err((code, message)) => {
                if code == 501 {
                    st.violations.push(format!("FakePve: {message}"));
                }
                match message.strip_prefix(PARAM_ERROR) {
                    Some(rest) => {
                        let (param, why) = rest.split_once('\0').unwrap_or((rest, ""));
                        let errors = json!({ param: why });
                        error_reply(400, "Parameter verification failed.", Some(errors))
                    }
                    None => error_reply(code, &message, None),
                }
            }
        };
        st.upload_data = None;
        let sleep = st.sleep.take();
        let reply = match fault {
            Some(fault) => {
                // By the time the reply is lost, the work is done.
                let started: Vec<String> = st
                    .tasks
                    .keys()
                    .filter(|u| !tasks_before.contains(*u))
                    .cloned()
                    .collect();
                for upid in started {
                    st.finish_task(&upid);
                }
                (fault.status, Body::Raw(fault.body))
            }
            None => reply,
        };
        drop(st);
        if let Some(sleep) = sleep {
            std::thread::sleep(sleep);
        }
        reply
    }
}

/// What [`Inner::handle`] needs of an HTTP request.
struct HttpRequest<'a> {
    method: &'a str,
    url: &'a str,
    auth: Option<&'a str>,
    content_type: &'a str,
    body: &'a [u8],
}

/// A reply body: PVE's JSON, or an injected fault's text as it is.
enum Body {
    Json(Value),
    Raw(String),
    /// pveproxy's answer when the node it proxies to does not answer: the reason phrase of an
    /// empty HTTP 595 reply.
    Proxy(String),
}

fn error_reply(code: u16, message: &str, errors: Option<Value>) -> (u16, Body) {
    let mut body = json!({ "data": null, "message": format!("{}\n", message.trim_end()) });
    if let Some(errors) = errors {
        body["errors"] = errors;
    }
    (code, Body::Json(body))
}

/// Query parameters, plus the body's (form-encoded, JSON, or an upload's multipart fields, whose
/// file part is returned beside them). A parameter given more than once (or a JSON array) is
/// kept as its values joined by NUL, as PVE turns it into an array; the schema check decides
/// whether that is allowed. Errors carry the HTTP status pve-http-server answers with.
fn request_params(
    query: &str,
    content_type: &str,
    body: &[u8],
    upload: bool,
) -> Result<(Params, Option<Vec<u8>>), Fail> {
    let mut pairs = form_decode(query);
    let mime = content_type.split(';').next().unwrap_or("").trim();
    let mut file = None;
    if upload {
        let boundary = regex::Regex::new(r"(?i);\s*boundary\s*=\s*(\S+?)\s*(?:;|$)")
            .unwrap()
            .captures(content_type)
            .map(|c| c[1].trim_matches('"').to_string());
        let (Some(boundary), "multipart/form-data") = (boundary, mime) else {
            return Err((
                500,
                format!("upload 'Content-Type '{content_type}' not implemented"),
            ));
        };
        if pairs.iter().any(|(k, _)| k == "tmpfilename") {
            return Err((
                500,
                "'tmpfilename' query parameter is not allowed for file uploads".into(),
            ));
        }
        let (fields, data) = parse_multipart(body, &boundary).map_err(|e| (500, e))?;
        let mut params = Params::new();
        for (k, v) in pairs.into_iter().chain(fields) {
            params.insert(k, v);
        }
        file = Some(data);
        return Ok((params, file));
    }
    if body.len() > MAX_POST {
        return Err((501, "for data too large".into()));
    }
    if mime == "application/json" {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| (400, format!("JSON body: {e}")))?;
        let object = value
            .as_object()
            .ok_or((400, "JSON body is not an object".into()))?;
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            Value::Bool(b) => if *b { "1" } else { "0" }.to_string(),
            other => other.to_string(),
        };
        for (k, v) in object {
            let v = match v {
                Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join("\0"),
                other => text(other),
            };
            pairs.push((k.clone(), v));
        }
    } else if mime.is_empty() || mime == "application/x-www-form-urlencoded" {
        let text = std::str::from_utf8(body).map_err(|_| (400, "body is not UTF-8".to_string()))?;
        pairs.extend(form_decode(text));
    } else if !body.is_empty() {
        return Err((
            506,
            format!("upload 'Content-Type '{content_type}' not implemented"),
        ));
    }
    let mut params = Params::new();
    for (k, v) in pairs {
        match params.get_mut(&k) {
            Some(old) => {
                old.push('\0');
                old.push_str(&v);
            }
            None => {
                params.insert(k, v);
            }
        }
    }
    Ok((params, file))
}
