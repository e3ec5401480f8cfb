//! The agentvm daemon: the one writer of one agentvm home's state. It serves
//! the CLI on a unix socket of its own per home, runs one operation at a time
//! per VM and many VMs in parallel, on start repairs what a killed predecessor
//! left behind, and (when started on demand) exits after a while idle.

mod clock;
mod connection;
mod egress;
pub mod entry;
pub mod idle;
mod lifecycle;
pub mod locks;
mod ops;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::{Mode, umask};
use tokio::net::UnixListener;
use tokio::sync::broadcast;

use crate::backend::libvirt::{Healing, LocalBackend};
use crate::backend::registry::Registry;
use crate::fsutil::create_private_dir;
use crate::paths::{self, Home};
use crate::protocol::{Event, PROTOCOL_VERSION};
use locks::VmLocks;

/// What every connection handler shares.
struct Shared {
    registry: Registry,
    locks: VmLocks,
    lifecycle: broadcast::Sender<Event>,
    /// Open connections and operations in flight, for idle exit.
    activity: idle::Activity,
    /// The egress proxies of VMs with allow lists.
    egress: Arc<egress::EgressHub>,
    home: String,
    uri: String,
    uid: u32,
}

/// How often an idle daemon checks whether its time is up.
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// How long a starting daemon waits for an exiting one to let go of the pid file.
const PID_FILE_PATIENCE: Duration = Duration::from_secs(3);

/// Runs the daemon in the foreground until SIGTERM or SIGINT, or until it has
/// been idle for `idle_exit`.
pub fn run(uri: &str, idle_exit: Option<Duration>) -> Result<()> {
    let home = Home::from_env()?;
    let socket = paths::socket_path(&home)?;
    if let Some(dir) = socket.parent() {
        create_private_dir(dir)?;
    }
    let _pid_lock = claim_pid_file(&paths::pid_file(&socket))?;
    // We hold the pid file lock, so a socket file left there is a dead daemon's.
    match fs::remove_file(&socket) {
        Ok(()) => tracing::warn!("replaced the stale socket {}", socket.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", socket.display())),
    }
    let backend = Arc::new(Healing::new(LocalBackend::connect(uri, home.clone())?));
    let repaired = backend.reconcile()?;
    for line in &repaired {
        tracing::warn!("repaired: {line}");
    }
    tracing::info!(
        "agentvm daemon {} (protocol {PROTOCOL_VERSION}) serving {} on {}; {} repair(s) at start; {}",
        std::process::id(),
        home.root().display(),
        socket.display(),
        repaired.len(),
        match idle_exit {
            Some(after) => format!("exits after {} idle", idle::describe(after)),
            None => "never exits when idle".to_string(),
        }
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let egress = Arc::new(egress::EgressHub::new(
        backend.clone(),
        &socket,
        runtime.handle().clone(),
    ));
    let shared = Arc::new(Shared {
        registry: Registry::new(backend, home.clone()),
        egress: egress.clone(),
        locks: VmLocks::default(),
        lifecycle: broadcast::channel(256).0,
        activity: idle::Activity::default(),
        home: home.root().display().to_string(),
        uri: uri.to_string(),
        uid: nix::unistd::getuid().as_raw(),
    });
    // The proxies of VMs with allow lists that run already (a previous
    // daemon's went with it).
    runtime.spawn_blocking(move || egress.resume());
    let result = runtime.block_on(serve(&socket, shared, idle_exit));
    // Removed while the pid file is still held: a new daemon never finds the
    // socket of one that is going away.
    let _ = fs::remove_file(&socket);
    result
}

/// Takes the flock on the pid file and writes our pid into it; one daemon per
/// socket. A daemon that is exiting (idle) holds it a moment longer than its
/// socket: that is waited for, briefly.
fn claim_pid_file(path: &Path) -> Result<Flock<File>> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let deadline = Instant::now() + PID_FILE_PATIENCE;
    let mut lock = loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => break lock,
            Err((back, _)) if Instant::now() < deadline => {
                file = back;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err((mut back, _)) => {
                let mut pid = String::new();
                let _ = back.read_to_string(&mut pid);
                bail!(
                    "an agentvm daemon is already running (pid {}, pid file {})",
                    pid.trim(),
                    path.display()
                );
            }
        }
    };
    lock.set_len(0)?;
    writeln!(lock, "{}", std::process::id())?;
    lock.sync_all()?;
    Ok(lock)
}

/// The pid recorded in a daemon's pid file, if a daemon holds it now.
pub fn running_pid(socket: &Path) -> Option<u32> {
    let path = paths::pid_file(socket);
    let file = File::open(&path).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => None,
        Err(_) => fs::read_to_string(&path).ok()?.trim().parse().ok(),
    }
}

async fn serve(socket: &Path, shared: Arc<Shared>, idle_exit: Option<Duration>) -> Result<()> {
    let listener = bind_private(socket)?;
    tokio::spawn(lifecycle::watch(shared.clone()));
    tokio::spawn(clock::watch(shared.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut idle_check = tokio::time::interval(IDLE_CHECK);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Busy from the accept on, so an idle exit cannot race it.
                    let busy = connection::Held::new(shared.clone());
                    tokio::spawn(connection::handle(stream, busy));
                }
                Err(e) => tracing::warn!("accept failed: {e}"),
            },
            _ = idle_check.tick(), if idle_exit.is_some() => {
                // A running egress proxy is work: its VM's way out.
                if let (Some(limit), Some(idle)) = (idle_exit, shared.activity.idle_for())
                    && idle >= limit
                    && !shared.egress.any_running()
                {
                    tracing::info!(
                        "idle for {} (no client, nothing in flight): exiting; the next command starts a new daemon",
                        idle::describe(limit)
                    );
                    break;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping");
    Ok(())
}

/// Binds the socket with mode 0600 from the start (umask), not after a chmod.
fn bind_private(socket: &Path) -> Result<UnixListener> {
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(socket);
    umask(old);
    let listener = bound.with_context(|| format!("binding {}", socket.display()))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(listener)?)
}

/// The systemd user unit `agentvm daemon --install-unit` writes: a service
/// stays up, so idle exit is off.
pub fn unit_text(exe: &Path, uri: &str) -> String {
    format!(
        "[Unit]\nDescription=agentvm daemon (agent VMs on libvirt)\n\n\
         [Service]\nExecStart={} daemon --connect {uri} --idle-exit {}\nRestart=on-failure\n\n\
         [Install]\nWantedBy=default.target\n",
        exe.display(),
        idle::IDLE_EXIT_OFF
    )
}

/// `$XDG_CONFIG_HOME/systemd/user/agentvm.service` (or under ~/.config).
pub fn unit_path() -> Result<PathBuf> {
    let config = match paths::non_empty_env("XDG_CONFIG_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(paths::non_empty_env("HOME").context("HOME is not set")?).join(".config")
        }
    };
    Ok(config.join("systemd/user").join(paths::UNIT_FILE))
}
