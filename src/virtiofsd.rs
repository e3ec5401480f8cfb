//! The virtiofsd that serves a virtio-fs share: finding it, starting one per
//! share before the VM starts, and telling whether it still runs.
//!
//! libvirt 9 will not run virtiofsd itself for a session-mode VM, so agentvm
//! runs it as the user: unprivileged, in a namespace sandbox, with the guest
//! user's ids mapped to the host user's, `--readonly` for read-only shares
//! (libvirt ignores `<readonly/>` on a socket source) and as many file
//! descriptors as the user may have (it holds one per file the guest looks up).
//! It exits by itself when the guest disconnects.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::domain::share::ShareState;
use crate::paths::{ENV_VIRTIOFSD, non_empty_env};

/// Where distributions install virtiofsd, after `$PATH`.
const KNOWN_PATHS: &[&str] = &[
    "/usr/libexec/virtiofsd",
    "/usr/lib/virtiofsd",
    "/usr/lib/qemu/virtiofsd",
];
/// How long a new virtiofsd may take to create its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// What to tell a user without a usable virtiofsd.
pub const INSTALL_HINT: &str = "install virtiofsd (the Rust one, 1.7 or newer: the `virtiofsd` package on Debian 13, \
     Ubuntu and Fedora, or `cargo install virtiofsd` with libseccomp-dev and libcap-ng-dev), \
     or set AGENTVM_VIRTIOFSD to its path; or give this share type = \"9p\" for a guest kernel with 9p";

/// The virtiofsd to run: `$AGENTVM_VIRTIOFSD`, else the first `virtiofsd` on
/// `$PATH`, else a distribution's path. It must be the Rust virtiofsd (the old C
/// one has no `--readonly` and no id translation). Once found it is kept for
/// the process; a miss is looked up again next time, so installing virtiofsd
/// needs no daemon restart.
pub fn binary() -> Result<PathBuf, String> {
    static FOUND: OnceLock<PathBuf> = OnceLock::new();
    if let Some(path) = FOUND.get() {
        return Ok(path.clone());
    }
    let path = find()?;
    Ok(FOUND.get_or_init(|| path).clone())
}

fn find() -> Result<PathBuf, String> {
    let candidate = if let Some(path) = non_empty_env(ENV_VIRTIOFSD) {
        Some(PathBuf::from(path))
    } else {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|dir| dir.join("virtiofsd"))
            .chain(KNOWN_PATHS.iter().map(PathBuf::from))
            .find(|p| p.is_file())
    };
    let Some(path) = candidate else {
        return Err(format!("no virtiofsd found: {INSTALL_HINT}"));
    };
    let help = Command::new(&path)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {} --help: {e}: {INSTALL_HINT}", path.display()))?;
    let text = String::from_utf8_lossy(&help.stdout) + String::from_utf8_lossy(&help.stderr);
    if !text.contains("--translate-uid") || !text.contains("--readonly") {
        return Err(format!(
            "{} is not a virtiofsd with --readonly and --translate-uid (too old, or the C one): {INSTALL_HINT}",
            path.display()
        ));
    }
    Ok(path)
}

/// The files of one share's virtiofsd.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    pub socket: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
}

/// The arguments for serving `share` on `socket` to a guest whose user is
/// `share.uid`/`share.gid`, as the host user `host_ids`.
pub fn args(share: &ShareState, socket: &Path, host_ids: (u32, u32), nofile: u64) -> Vec<String> {
    let mut args = vec![
        format!("--socket-path={}", socket.display()),
        format!("--shared-dir={}", share.host.display()),
        "--sandbox=namespace".to_string(),
        "--cache=auto".to_string(),
        format!("--translate-uid=map:{}:{}:1", share.uid, host_ids.0),
        format!("--translate-gid=map:{}:{}:1", share.gid, host_ids.1),
        format!("--rlimit-nofile={nofile}"),
        "--log-level=warn".to_string(),
    ];
    if share.readonly {
        args.push("--readonly".to_string());
    }
    args
}

/// The most open files this process may raise itself to (its hard limit).
pub fn nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(1024)
}

/// Starts a virtiofsd for `share` and waits for its socket. A virtiofsd left on
/// the same socket (from a VM that did not start) is stopped first. The child
/// is in its own process group, so it outlives the daemon that started it.
pub fn start(share: &ShareState, files: &ServerFiles) -> Result<Child> {
    let binary = binary().map_err(|e| anyhow!(e))?;
    stop(files);
    let log =
        File::create(&files.log).with_context(|| format!("creating {}", files.log.display()))?;
    let ids = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let mut child = Command::new(&binary)
        .args(args(share, &files.socket, ids, nofile_limit()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating the log file")?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    crate::fsutil::write_atomic(&files.pid, format!("{}\n", child.id()).as_bytes(), 0o600)
        .with_context(|| format!("writing {}", files.pid.display()))?;
    let deadline = Instant::now() + SOCKET_WAIT;
    while !files.socket.exists() {
        if let Some(status) = child.try_wait().context("waiting for virtiofsd")? {
            let _ = std::fs::remove_file(&files.pid);
            return Err(anyhow!(
                "virtiofsd for {} exited at once ({status}): {}",
                share.host.display(),
                log_tail(&files.log)
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(anyhow!(
                "virtiofsd for {} made no socket in {} s: {}",
                share.host.display(),
                SOCKET_WAIT.as_secs(),
                log_tail(&files.log)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(child)
}

/// The pid of the virtiofsd serving `files.socket`, if one runs (its pid file
/// names a live process whose command line names the socket).
pub fn running(files: &ServerFiles) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(&files.pid)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let wanted = format!("--socket-path={}", files.socket.display());
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == wanted.as_bytes())
        .then_some(pid)
}

/// Stops the virtiofsd of `files` if it runs, and removes its socket and pid file.
pub fn stop(files: &ServerFiles) {
    if let Some(pid) = running(files) {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while running(files).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if running(files).is_some() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    let _ = std::fs::remove_file(&files.socket);
    let _ = std::fs::remove_file(&files.pid);
}

/// The last lines virtiofsd logged, for an error message.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        format!("(nothing in {})", log.display())
    } else {
        lines.into_iter().rev().collect::<Vec<_>>().join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ShareKind;

    #[test]
    fn args_map_ids_and_enforce_readonly() {
        let share = ShareState {
            host: PathBuf::from("/home/u/src"),
            guest: "/work".into(),
            kind: ShareKind::Virtiofs,
            readonly: true,
            uid: 1000,
            gid: 100,
        };
        let args = args(&share, Path::new("/run/s.sock"), (1001, 1002), 4096);
        assert!(args.contains(&"--socket-path=/run/s.sock".to_string()));
        assert!(args.contains(&"--shared-dir=/home/u/src".to_string()));
        assert!(args.contains(&"--translate-uid=map:1000:1001:1".to_string()));
        assert!(args.contains(&"--translate-gid=map:100:1002:1".to_string()));
        assert!(args.contains(&"--rlimit-nofile=4096".to_string()));
        assert!(args.contains(&"--readonly".to_string()));
        let rw = ShareState {
            readonly: false,
            ..share
        };
        assert!(!args_of(&rw).contains(&"--readonly".to_string()));
    }

    fn args_of(share: &ShareState) -> Vec<String> {
        args(share, Path::new("/s"), (1, 1), 1)
    }

    #[test]
    fn a_stale_pid_file_is_not_a_running_server() {
        let dir = tempfile::tempdir().unwrap();
        let files = ServerFiles {
            socket: dir.path().join("s.sock"),
            pid: dir.path().join("s.pid"),
            log: dir.path().join("s.log"),
        };
        assert_eq!(running(&files), None);
        // Our own pid is alive, but its command line names no such socket.
        std::fs::write(&files.pid, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(running(&files), None);
        stop(&files);
        assert!(!files.pid.exists());
    }
}
