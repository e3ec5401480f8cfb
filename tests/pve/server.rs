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
//!
//! [`FakePve::fail_next`] and [`FakePve::lose_next_reply`] replace the reply to one request with
//! any status and body, before or after carrying it out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde_json::{Value, json};

use super::http::{form_decode, percent_decode};
use super::model::{FakeAcl, FakeOptions, FakePool, FakeTask, FakeUser, FakeVm, Recorded};
use super::schema::Schema;
use super::state::{Fault, Params, State};
use super::syntax::{parse_token_header, token_header};

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
        let mut body = Vec::new();
        let _ = request.as_reader().read_to_end(&mut body);

        let (status, reply) = self.handle(&method, &url, auth.as_deref(), &content_type, &body);
        let (text, content_type) = match reply {
            Body::Json(value) => (value.to_string(), "application/json;charset=UTF-8"),
            Body::Raw(text) if serde_json::from_str::<Value>(&text).is_ok() => {
                (text, "application/json;charset=UTF-8")
            }
            Body::Raw(text) => (text, "text/html;charset=UTF-8"),
        };
        let response = tiny_http::Response::from_string(text)
            .with_status_code(status)
            .with_header(tiny_http::Header::from_bytes("Content-Type", content_type).unwrap());
        let _ = request.respond(response);
    }

    /// One request → (HTTP status, body).
    fn handle(
        &self,
        method: &str,
        url: &str,
        auth: Option<&str>,
        content_type: &str,
        body: &[u8],
    ) -> (u16, Body) {
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
        let fault = st.take_fault(method, &path);
        if let Some(fault) = &fault
            && !fault.carried_out
        {
            return (fault.status, Body::Raw(fault.body.clone()));
        }
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let tasks_before: BTreeSet<String> = st.tasks.keys().cloned().collect();
        let reply = match st.route(&caller, method, &segs, &params) {
            Ok(data) => (200, Body::Json(json!({ "data": data }))),
            Err((code, message)) => {
                if code == 501 {
                    st.violations.push(format!("FakePve: {message}"));
                }
                error_reply(code, &message, None)
            }
        };
        match fault {
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
        }
    }
}

/// A reply body: PVE's JSON, or an injected fault's text as it is.
enum Body {
    Json(Value),
    Raw(String),
}

fn error_reply(code: u16, message: &str, errors: Option<Value>) -> (u16, Body) {
    let mut body = json!({ "data": null, "message": format!("{}\n", message.trim_end()) });
    if let Some(errors) = errors {
        body["errors"] = errors;
    }
    (code, Body::Json(body))
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
