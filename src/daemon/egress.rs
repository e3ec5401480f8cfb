//! Egress allow lists, enforced on the host: for each running local VM whose
//! policy is a list, the daemon serves an HTTP proxy on a unix socket of the
//! VM's own (`paths::egress_socket`: the socket is the VM's identity) and
//! keeps an SSH reverse forward from the guest's `127.0.0.1:3128` to it,
//! restarted while the VM runs. The guest's own connections out are refused
//! by QEMU (`restrict=on`), so the proxy is its only way out. Decisions are
//! logged and kept, the last [`RING`] per VM, for `agentvm egress NAME`.

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixListener;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::backend::Backend;
use crate::backoff::Backoff;
use crate::clock::format_time;
use crate::egress_proxy::{self, EgressEvent};
use crate::paths;
use crate::protocol::{EgressReport, Op, Outcome, TunnelStatus};
use crate::spec::{Egress, GUEST_PROXY_PORT, LOCAL_BACKEND};

/// How many connections are kept per VM.
pub const RING: usize = 200;
/// Pause before the tunnel is tried again, growing to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// What ssh prints (at DEBUG1) once the server accepted the reverse forward.
const FORWARD_ACCEPTED: &str = "remote forward success";

/// Every VM's egress proxy and tunnel in this daemon.
pub struct EgressHub {
    backend: Arc<dyn Backend>,
    daemon_socket: PathBuf,
    runtime: Handle,
    vms: Mutex<HashMap<String, Running>>,
    /// Kept after a VM stops, so its last connections can still be shown.
    logs: Mutex<HashMap<String, Arc<Mutex<VecDeque<EgressEvent>>>>>,
}

struct Running {
    policy: Egress,
    socket: PathBuf,
    tunnel: Arc<Mutex<TunnelState>>,
    proxy: JoinHandle<()>,
    keeper: JoinHandle<()>,
}

#[derive(Debug, Clone)]
enum TunnelState {
    Connecting,
    Up(std::time::SystemTime),
    Down(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EgressHub {
    /// `backend` is the local backend: allow lists exist only there.
    pub fn new(backend: Arc<dyn Backend>, daemon_socket: &Path, runtime: Handle) -> Self {
        Self {
            backend,
            daemon_socket: daemon_socket.to_path_buf(),
            runtime,
            vms: Mutex::default(),
            logs: Mutex::default(),
        }
    }

    /// Whether any VM's proxy runs (the daemon then does not exit idle).
    pub fn any_running(&self) -> bool {
        !lock(&self.vms).is_empty()
    }

    /// Makes the proxy and tunnel of `vm` match the policy its domain was
    /// defined with: started for an allow list, stopped otherwise.
    pub fn ensure(self: &Arc<Self>, vm: &str) {
        // The policy only, from the domain's metadata: a full status would
        // ask the guest agent too, on the path of every `up`.
        let policy = match self.backend.find(vm) {
            Ok(Some(existing)) => existing.egress,
            // Not a local VM (or gone): nothing to serve.
            Ok(None) | Err(crate::backend::BackendError::NotFound(_)) => Egress::Open,
            Err(e) => {
                tracing::warn!("{vm}: egress: reading its policy: {e}");
                return;
            }
        };
        if !matches!(policy, Egress::Allow(_)) {
            self.stop(vm);
            return;
        }
        {
            let vms = lock(&self.vms);
            if let Some(running) = vms.get(vm)
                && running.policy == policy
                && !running.keeper.is_finished()
            {
                return;
            }
        }
        self.stop(vm);
        if let Err(e) = self.start(vm, policy) {
            tracing::warn!("{vm}: egress proxy not started: {e:#}");
        }
    }

    /// Starts the egress of every running local VM with an allow list (after
    /// a daemon restart, the old daemon's went with it).
    pub fn resume(self: &Arc<Self>) {
        match self.backend.list(&[]) {
            Ok(vms) => {
                for vm in vms.iter().filter(|s| matches!(s.egress, Egress::Allow(_))) {
                    if vm.state == crate::backend::State::Running {
                        self.ensure(&vm.name);
                    }
                }
            }
            Err(e) => tracing::warn!("egress: listing VMs to resume their proxies: {e}"),
        }
    }

    fn start(self: &Arc<Self>, vm: &str, policy: Egress) -> Result<()> {
        let socket = paths::egress_socket(&self.daemon_socket, vm);
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", socket.display()));
            }
            _ => {}
        }
        let _guard = self.runtime.enter();
        let listener =
            UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        let log = self.log(vm);
        let name = vm.to_string();
        let record: egress_proxy::Record = Arc::new(move |event| {
            let mut ring = lock(&log);
            if ring.len() == RING {
                ring.pop_front();
            }
            ring.push_back(event);
        });
        let proxy = self.runtime.spawn(egress_proxy::serve(
            listener,
            name.clone(),
            policy.clone(),
            record,
        ));
        let tunnel = Arc::new(Mutex::new(TunnelState::Connecting));
        let keeper = self.runtime.spawn(keep_tunnel(
            self.clone(),
            name,
            socket.clone(),
            tunnel.clone(),
        ));
        tracing::info!("{vm}: egress proxy on {} for {policy}", socket.display());
        lock(&self.vms).insert(
            vm.to_string(),
            Running {
                policy,
                socket,
                tunnel,
                proxy,
                keeper,
            },
        );
        Ok(())
    }

    /// Stops the proxy and tunnel of `vm`, if it has them.
    pub fn stop(&self, vm: &str) {
        let Some(running) = lock(&self.vms).remove(vm) else {
            return;
        };
        running.proxy.abort();
        running.keeper.abort();
        let _ = std::fs::remove_file(&running.socket);
        tracing::info!("{vm}: egress proxy stopped");
    }

    fn log(&self, vm: &str) -> Arc<Mutex<VecDeque<EgressEvent>>> {
        lock(&self.logs).entry(vm.to_string()).or_default().clone()
    }

    /// What `agentvm egress NAME` shows, for a VM with `policy`.
    pub fn report(&self, vm: &str, policy: Egress) -> EgressReport {
        let tunnel = self.tunnel(vm);
        let connections = lock(&self.log(vm)).iter().cloned().collect();
        EgressReport {
            policy,
            tunnel,
            connections,
        }
    }

    /// The state of `vm`'s tunnel, if a proxy runs for it.
    pub fn tunnel(&self, vm: &str) -> Option<TunnelStatus> {
        let vms = lock(&self.vms);
        let running = vms.get(vm)?;
        let (up, detail) = match &*lock(&running.tunnel) {
            TunnelState::Connecting => (false, "connecting".to_string()),
            TunnelState::Up(since) => (true, format!("up since {}", format_time(*since))),
            TunnelState::Down(why) => (false, format!("down: {why}")),
        };
        Some(TunnelStatus {
            up,
            detail,
            socket: running.socket.clone(),
        })
    }

    /// Drops `vm`'s proxy when the keeper holding `state` ended on its own
    /// (the VM stopped), unless a newer one replaced it meanwhile.
    fn forget(&self, vm: &str, state: &Arc<Mutex<TunnelState>>) {
        let mut vms = lock(&self.vms);
        if vms.get(vm).is_some_and(|r| Arc::ptr_eq(&r.tunnel, state))
            && let Some(running) = vms.remove(vm)
        {
            running.proxy.abort();
            let _ = std::fs::remove_file(&running.socket);
        }
    }
}

/// Holds the reverse forward open while the VM runs: started, watched, and
/// started again when it dies.
async fn keep_tunnel(
    hub: Arc<EgressHub>,
    vm: String,
    socket: PathBuf,
    state: Arc<Mutex<TunnelState>>,
) {
    let mut pause = Backoff::new(RETRY_MIN, RETRY_MAX);
    loop {
        let (backend, name) = (hub.backend.clone(), vm.clone());
        let ready = tokio::task::spawn_blocking(move || {
            if !backend.is_running(&name)? {
                return Ok(None);
            }
            backend.ssh_endpoint(&name).map(Some)
        })
        .await;
        let endpoint = match ready {
            Ok(Ok(Some(endpoint))) => endpoint,
            Ok(Ok(None)) => {
                tracing::info!("{vm}: not running: egress proxy stopped");
                break;
            }
            Ok(Err(crate::backend::BackendError::NotFound(_))) => {
                tracing::info!("{vm}: gone: egress proxy stopped");
                break;
            }
            Ok(Err(e)) => {
                *lock(&state) = TunnelState::Down(e.to_string());
                tokio::time::sleep(pause.step()).await;
                continue;
            }
            Err(_) => break,
        };
        let why = run_tunnel(&vm, &endpoint, &socket, &state).await;
        let was_up = matches!(*lock(&state), TunnelState::Up(_));
        if was_up {
            tracing::warn!("{vm}: egress tunnel went down: {why}; starting it again");
            pause = Backoff::new(RETRY_MIN, RETRY_MAX);
        } else {
            tracing::debug!("{vm}: egress tunnel not up yet: {why}");
        }
        *lock(&state) = TunnelState::Down(why);
        tokio::time::sleep(pause.step()).await;
    }
    hub.forget(&vm, &state);
}

/// One ssh holding `-R 127.0.0.1:3128:SOCKET`; returns why it ended.
async fn run_tunnel(
    vm: &str,
    endpoint: &crate::ssh::Endpoint,
    socket: &Path,
    state: &Arc<Mutex<TunnelState>>,
) -> String {
    let forward = format!("127.0.0.1:{GUEST_PROXY_PORT}:{}", socket.display());
    let mut cmd = tokio::process::Command::from(endpoint.tunnel(
        &[
            // DEBUG1 makes ssh say when the guest accepted the forward.
            ("LogLevel", "DEBUG1"),
            ("BatchMode", "yes"),
            ("ExitOnForwardFailure", "yes"),
            ("ServerAliveInterval", "5"),
            ("ServerAliveCountMax", "3"),
            ("ConnectTimeout", "10"),
        ],
        &["-R".to_string(), forward],
    ));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return format!("starting ssh: {e}"),
    };
    *lock(state) = TunnelState::Connecting;
    let mut last_error = String::new();
    if let Some(stderr) = child.stderr.take() {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(FORWARD_ACCEPTED) {
                tracing::info!("{vm}: egress tunnel up (guest 127.0.0.1:{GUEST_PROXY_PORT})");
                *lock(state) = TunnelState::Up(now());
            } else if !line.starts_with("debug") {
                last_error = line;
            }
        }
    }
    let status = child.wait().await;
    match (status, last_error.is_empty()) {
        (Ok(_), false) => last_error,
        (Ok(status), true) => format!("ssh exited ({status})"),
        (Err(e), _) => format!("waiting for ssh: {e}"),
    }
}

fn now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

/// What the daemon adds to an operation's outcome on `vm`: the proxy is
/// started after `up`, stopped after `down` and `destroy`, and its state
/// joins `status` and `egress`.
pub fn after(
    hub: &Arc<EgressHub>,
    vm: &str,
    op: &Op,
    result: &mut Result<Outcome, crate::backend::BackendError>,
) {
    let outcome = match result {
        Ok(outcome) => outcome,
        // An up that failed after the start (waiting timed out, say) may
        // leave the VM running: it gets its proxy all the same.
        Err(_) if matches!(op, Op::Up { .. }) => return hub.ensure(vm),
        Err(_) => return,
    };
    match (op, outcome) {
        (Op::Up { .. }, Outcome::Up(up)) if up.backend == LOCAL_BACKEND => hub.ensure(vm),
        (Op::Down { .. }, _) | (Op::Destroy, _) => hub.stop(vm),
        (Op::Status, Outcome::Status(status)) => {
            status.egress_tunnel = hub.tunnel(vm).map(|t| t.detail);
        }
        (Op::Egress, Outcome::Egress(report)) => {
            *report = hub.report(vm, report.policy.clone());
        }
        _ => {}
    }
}
