//! A small Proxmox VE API client: token auth, TLS as configured, retries for
//! transient failures, and waiting for tasks (UPIDs) to finish.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

pub use super::upid::Upid;
use crate::paths::non_empty_env;
use crate::progress::Reporter;
use crate::spec::{ProxmoxSpec, TlsMode, TokenSource};

/// Attempts for a request that fails transiently (lock timeouts, 5xx).
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const TASK_POLL: Duration = Duration::from_millis(250);
const TASK_LOG_TAIL: usize = 10;
/// How much of an unexpected reply body an error quotes.
const EXCERPT_CHARS: usize = 200;
/// An upload may take this long, plus its size at [`UPLOAD_MIN_RATE`].
const UPLOAD_BASE: Duration = Duration::from_secs(600);
/// The slowest upload (bytes per second) that still finishes in time.
const UPLOAD_MIN_RATE: u64 = 256 * 1024;
/// How often an upload's progress is reported.
const UPLOAD_PROGRESS: Duration = Duration::from_millis(250);

/// Errors the backend acts on.
#[derive(Debug, thiserror::Error)]
pub enum PveError {
    #[error(
        "{method} {path}: token rejected (401): check the API token (USER@REALM!TOKENID=SECRET) — it may be mistyped, expired or deleted"
    )]
    Unauthorized { method: String, path: String },
    #[error(
        "{method} {path}: the token lacks privilege {needs} (403: {message}); grant it to the token and its user (the PVEVMAdmin role on the pool has every VM.* privilege)"
    )]
    Forbidden {
        method: String,
        path: String,
        message: String,
        /// What the call needs, from the API schema's permissions.
        needs: String,
    },
    #[error("{method} {path}: HTTP {status}: {message}")]
    Api {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    /// A reply PVE does not send: a body that is not JSON (a proxy's error page, a cut-off
    /// reply), or a success without `data`.
    #[error("{method} {path}: HTTP {status}: {problem}; the body starts \"{excerpt}\"")]
    BadReply {
        method: String,
        path: String,
        status: u16,
        problem: &'static str,
        /// The body's first characters, control characters escaped.
        excerpt: String,
    },
    /// No HTTP reply: connecting, sending or reading failed.
    #[error("{method} {path}: {message}")]
    Transport {
        method: String,
        path: String,
        message: String,
        /// The connection was made, so the request may have reached PVE.
        connected: bool,
    },
}

impl PveError {
    /// Whether PVE may have carried out the request that failed: a 5xx other than PVE's lock
    /// timeout and its definite refusals, a 2xx or 5xx reply that could not be read, or a
    /// connection lost after it was made. After [`Client::post_once`] fails so, look (for a
    /// clone: whether the new VMID exists) before sending it again.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Self::Api {
                status, message, ..
            } => (500..600).contains(status) && !is_lock_timeout(message) && !definite(message),
            Self::BadReply { status, .. } => !(400..500).contains(status),
            Self::Transport { connected, .. } => *connected,
            Self::Unauthorized { .. } | Self::Forbidden { .. } => false,
        }
    }
}

/// Which failures of a request are worth sending it again for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Lock timeouts and transient 5xx: for requests that may be repeated.
    Transient,
    /// Only PVE's lock timeout, which says the request was not carried out.
    LockTimeout,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::blocking::Client,
    base: String,
    auth: String,
}

impl Client {
    /// A client for backend `backend` with `token` (read by [`read_token`]).
    pub fn new(backend: &str, spec: &ProxmoxSpec, token: &str) -> Result<Self> {
        let mut builder = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("agentvm/", env!("CARGO_PKG_VERSION")));
        builder = match &spec.tls {
            TlsMode::Verified => builder,
            TlsMode::Insecure => {
                tracing::warn!(
                    "backend {backend}: TLS verification is OFF (insecure = true): anyone on the path can read the API token"
                );
                eprintln!(
                    "agentvm: WARNING: backend {backend}: TLS certificate NOT verified (insecure = true)"
                );
                builder.danger_accept_invalid_certs(true)
            }
            TlsMode::Fingerprint(hex) => builder.use_preconfigured_tls(super::tls::pinned(hex)?),
        };
        Ok(Self {
            http: builder.build().context("building the HTTP client")?,
            base: format!("{}/api2/json", spec.endpoint),
            auth: format!("PVEAPIToken={token}"),
        })
    }

    pub fn get(&self, path: &str, params: &[(&str, String)]) -> Result<Value, PveError> {
        self.request(reqwest::Method::GET, path, params, Retry::Transient)
    }

    /// A POST that may be repeated (start, stop, config, agent calls): lock timeouts and
    /// transient 5xx are retried.
    pub fn post(&self, path: &str, params: &[(&str, String)]) -> Result<Value, PveError> {
        self.request(reqwest::Method::POST, path, params, Retry::Transient)
    }

    /// A POST that must not be repeated blindly because it creates something, such as
    /// `/nodes/{node}/qemu/{vmid}/clone`: it is sent again only after PVE's lock timeout
    /// ("can't lock file … got timeout"), which says nothing was done. Any other failure is
    /// returned at once; when [`PveError::outcome_unknown`], the caller looks whether the thing
    /// exists before it tries again.
    pub fn post_once(&self, path: &str, params: &[(&str, String)]) -> Result<Value, PveError> {
        self.request(reqwest::Method::POST, path, params, Retry::LockTimeout)
    }

    /// One GET with its own time limit and no retry: for questions whose answer
    /// may be "not now" (a guest agent that hangs must not hold up a list).
    pub fn get_quick(
        &self,
        path: &str,
        params: &[(&str, String)],
        limit: Duration,
    ) -> Result<Value, PveError> {
        self.send(&reqwest::Method::GET, path, params, Some(limit))
    }

    /// One POST with its own time limit and no retry (agent pings while waiting).
    pub fn post_quick(
        &self,
        path: &str,
        params: &[(&str, String)],
        limit: Duration,
    ) -> Result<Value, PveError> {
        self.send(&reqwest::Method::POST, path, params, Some(limit))
    }

    pub fn put(&self, path: &str, params: &[(&str, String)]) -> Result<Value, PveError> {
        self.request(reqwest::Method::PUT, path, params, Retry::Transient)
    }

    pub fn delete(&self, path: &str, params: &[(&str, String)]) -> Result<Value, PveError> {
        self.request(reqwest::Method::DELETE, path, params, Retry::Transient)
    }

    /// One API call, sent again with backoff after the failures `retry` allows.
    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        params: &[(&str, String)],
        retry: Retry,
    ) -> Result<Value, PveError> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match self.once(&method, path, params) {
                Err(e) if attempt < ATTEMPTS && worth_retrying(retry, &e) => {
                    tracing::info!("{e}; retrying in {backoff:?}");
                    std::thread::sleep(backoff);
                    backoff *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn once(
        &self,
        method: &reqwest::Method,
        path: &str,
        params: &[(&str, String)],
    ) -> Result<Value, PveError> {
        self.send(method, path, params, None)
    }

    fn send(
        &self,
        method: &reqwest::Method,
        path: &str,
        params: &[(&str, String)],
        limit: Option<Duration>,
    ) -> Result<Value, PveError> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .header("Authorization", &self.auth);
        if let Some(limit) = limit {
            request = request.timeout(limit);
        }
        let request = if matches!(*method, reqwest::Method::GET | reqwest::Method::DELETE) {
            request.query(params)
        } else {
            request.form(params)
        };
        self.reply(method, path, request)
    }

    /// Uploads `file` (`size` bytes) to `path` as PVE's upload handler
    /// (pveproxy) reads it: multipart/form-data with a Content-Length, the text
    /// `fields` first — pveproxy takes `content`, `checksum-algorithm` and
    /// `checksum` in that order, before the file — then the file as the part
    /// `filename`, streamed from disk. Sent once; its time limit grows with
    /// the size. The bytes read so far go to `progress` as `label`.
    pub fn upload(
        &self,
        path: &str,
        fields: &[(&'static str, String)],
        (file, size, file_name): (std::fs::File, u64, &str),
        progress: &dyn Reporter,
        label: &str,
    ) -> Result<Value, PveError> {
        let read = Arc::new(AtomicU64::new(0));
        let reader = Counted {
            inner: file,
            read: read.clone(),
        };
        let part = reqwest::blocking::multipart::Part::reader_with_length(reader, size)
            .file_name(file_name.to_string());
        let form = fields
            .iter()
            .fold(reqwest::blocking::multipart::Form::new(), |form, (k, v)| {
                form.text(*k, v.clone())
            })
            .part("filename", part);
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("Authorization", &self.auth)
            .timeout(upload_limit(size))
            .multipart(form);
        let finished = AtomicBool::new(false);
        let reply = std::thread::scope(|scope| {
            scope.spawn(|| {
                while !finished.load(Ordering::Relaxed) {
                    progress.bytes(label, read.load(Ordering::Relaxed), size);
                    std::thread::sleep(UPLOAD_PROGRESS);
                }
            });
            let reply = self.reply(&reqwest::Method::POST, path, request);
            finished.store(true, Ordering::Relaxed);
            reply
        });
        progress.bytes(label, read.load(Ordering::Relaxed), size);
        progress.bytes_done(label);
        reply
    }

    /// Sends a request and reads PVE's reply: its `data`, or the error it means.
    fn reply(
        &self,
        method: &reqwest::Method,
        path: &str,
        request: reqwest::blocking::RequestBuilder,
    ) -> Result<Value, PveError> {
        let (method, path) = (method.to_string(), path.to_string());
        let transport = |e: reqwest::Error, connected: bool| PveError::Transport {
            message: format!("{:#}", anyhow::Error::from(e)),
            method: method.clone(),
            path: path.clone(),
            connected,
        };
        let response = request.send().map_err(|e| {
            let connected = !e.is_connect();
            transport(e, connected)
        })?;
        let status = response.status().as_u16();
        let reason = response
            .status()
            .canonical_reason()
            .unwrap_or("")
            .to_string();
        let bytes = response.bytes().map_err(|e| transport(e, true))?;
        if status == 401 {
            return Err(PveError::Unauthorized { method, path });
        }
        let bad_reply = |problem| PveError::BadReply {
            method: method.clone(),
            path: path.clone(),
            status,
            problem,
            excerpt: excerpt(&bytes),
        };
        let Ok(body) = serde_json::from_slice::<Value>(&bytes) else {
            return Err(bad_reply("the reply is not JSON"));
        };
        match status {
            200..=299 => body
                .get("data")
                .cloned()
                .ok_or_else(|| bad_reply("the JSON reply has no \"data\"")),
            403 => Err(PveError::Forbidden {
                needs: super::privileges::required(&method, &path)
                    .unwrap_or("(see the message)")
                    .to_string(),
                method,
                path,
                message: error_message(&body, &reason),
            }),
            _ => Err(PveError::Api {
                method,
                path,
                status,
                message: error_message(&body, &reason),
            }),
        }
    }

    /// Polls a task until it stops. `OK` and `WARNINGS: n` are success; a failure
    /// reports the end of the task's log. `upid` is what the request that started the task
    /// returned: anything but a UPID is an error.
    pub fn wait_task(
        &self,
        upid: &Value,
        what: &str,
        progress: &dyn Reporter,
        vm: &str,
    ) -> Result<()> {
        let Some(upid) = upid.as_str().and_then(Upid::parse) else {
            bail!(
                "{what}: Proxmox answered {} where a task id (UPID:node:pid:pstart:starttime:type:id:user:) was expected",
                excerpt(upid.to_string().as_bytes())
            );
        };
        let start = Instant::now();
        loop {
            let status = self.get(&upid.path("/status"), &[])?;
            match status["status"].as_str() {
                Some("running") => {}
                Some("stopped") => {
                    let exit = status["exitstatus"].as_str().unwrap_or("(no exit status)");
                    if exit == "OK" || exit.starts_with("WARNINGS") {
                        progress.step(
                            vm,
                            &format!("{what} done ({:.1} s)", start.elapsed().as_secs_f64()),
                        );
                        return Ok(());
                    }
                    bail!("{what} failed: {exit}\n  {}", self.task_log_tail(&upid));
                }
                _ => bail!(
                    "{what}: the status of task {upid} is neither running nor stopped: {}",
                    excerpt(status.to_string().as_bytes())
                ),
            }
            std::thread::sleep(TASK_POLL);
        }
    }

    /// The last lines of a task's log, or why they could not be read.
    fn task_log_tail(&self, upid: &Upid) -> String {
        let log = match self.get(
            &upid.path("/log"),
            &[("start", "0".into()), ("limit", "500".into())],
        ) {
            Ok(log) => log,
            Err(e) => return format!("(the task log could not be read: {e})"),
        };
        let lines: Vec<&str> = log
            .as_array()
            .map(|l| l.iter().filter_map(|e| e["t"].as_str()).collect())
            .unwrap_or_default();
        lines[lines.len().saturating_sub(TASK_LOG_TAIL)..].join("\n  ")
    }
}

/// The time limit of an upload of `size` bytes (the client's usual 60 s would
/// end any image upload midway).
fn upload_limit(size: u64) -> Duration {
    UPLOAD_BASE + Duration::from_secs(size / UPLOAD_MIN_RATE)
}

/// A reader that counts the bytes read through it.
struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Whether a failed request is sent again under `retry`.
fn worth_retrying(retry: Retry, error: &PveError) -> bool {
    match (retry, error) {
        (_, PveError::Api { message, .. }) if is_lock_timeout(message) => true,
        (
            Retry::Transient,
            PveError::Api {
                status, message, ..
            },
        ) => transient(*status, message),
        (Retry::Transient, PveError::BadReply { status, .. }) => (500..600).contains(status),
        _ => false,
    }
}

/// PVE's "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout": the request
/// gave up before doing anything.
fn is_lock_timeout(message: &str) -> bool {
    message.contains("can't lock file") && message.contains("got timeout")
}

/// 5xx messages that are PVE's final answer, not a passing failure.
fn definite(message: &str) -> bool {
    const DEFINITE: &[&str] = &[
        "already exists",
        "guest agent is not running",
        "not supported",
        "does not exist",
        "not running",
    ];
    DEFINITE.iter().any(|d| message.contains(d))
}

/// Lock timeouts anywhere, and 5xx that are not a definite answer, are worth another try.
fn transient(status: u16, message: &str) -> bool {
    if message.contains("can't lock file") || message.contains("got timeout") {
        return true;
    }
    (500..600).contains(&status) && !definite(message)
}

/// The first [`EXCERPT_CHARS`] characters of a body, control characters escaped.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == EXCERPT_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn error_message(body: &Value, reason: &str) -> String {
    let mut message = body["message"]
        .as_str()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .unwrap_or(reason)
        .to_string();
    if let Some(errors) = body["errors"].as_object() {
        for (param, why) in errors {
            message.push_str(&format!(
                "; {param}: {}",
                why.as_str().unwrap_or_default().trim()
            ));
        }
    }
    message
}

/// The token from its source, checked for the `USER@REALM!TOKENID=SECRET` shape.
/// Its value is never logged.
pub fn read_token(backend: &str, source: &TokenSource) -> Result<String> {
    let token = match source {
        TokenSource::Env(var) => non_empty_env(var)
            .ok_or_else(|| anyhow!("backend {backend}: the token variable {var} is not set"))?,
        TokenSource::File(path) => std::fs::read_to_string(path).with_context(|| {
            format!(
                "backend {backend}: reading the token file {}",
                path.display()
            )
        })?,
    };
    let token = token.trim().to_string();
    let valid = token.split_once('=').is_some_and(|(id, secret)| {
        !secret.is_empty()
            && id
                .split_once('!')
                .is_some_and(|(user, tokenid)| user.contains('@') && !tokenid.is_empty())
    });
    if !valid {
        bail!("backend {backend}: the API token must look like USER@REALM!TOKENID=SECRET");
    }
    Ok(token)
}

/// Proxmox wants `sshkeys` URL-encoded: spaces as `%20` (never `+`), newlines between keys.
pub fn encode_ssh_keys(keys: &[String]) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(&keys.join("\n"), KEEP).to_string()
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
