//! `daemon` (run, install a unit, stop) and `proxmox bootstrap-user`, which
//! sets a Proxmox VE node up for agentvm rather than acting on a VM.

use std::os::unix::process::CommandExt;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{App, output};

pub fn daemon(uri: &str, install_unit: bool, stop: bool, idle_exit: &str) -> Result<i32> {
    if install_unit {
        let path = crate::daemon::unit_path()?;
        let exe = std::env::current_exe().context("finding the agentvm executable")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        crate::fsutil::write_atomic(&path, crate::daemon::unit_text(&exe, uri).as_bytes(), 0o644)?;
        outln!("wrote {}", path.display());
        outln!(
            "enable it with: systemctl --user daemon-reload && systemctl --user enable --now agentvm"
        );
        return Ok(0);
    }
    if stop {
        return stop_daemon();
    }
    // The daemon is its own executable (the CLI loads no libvirt): become it.
    crate::daemon::idle::parse_idle_exit(idle_exit)?;
    let daemon = crate::daemon::entry::daemon_exe()?;
    let err = std::process::Command::new(&daemon)
        .args(["--connect", uri, "--idle-exit", idle_exit])
        .exec();
    Err(anyhow::Error::new(err).context(format!("running {}", daemon.display())))
}

/// Stops the daemon of this home (or of `AGENTVM_SOCKET`).
fn stop_daemon() -> Result<i32> {
    let socket = crate::paths::socket_path(&crate::paths::Home::from_env()?)?;
    let Some(pid) = crate::daemon::running_pid(&socket) else {
        outln!("no agentvm daemon is running");
        return Ok(0);
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .with_context(|| format!("signalling the daemon (pid {pid})"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while crate::daemon::running_pid(&socket).is_some() {
        if std::time::Instant::now() > deadline {
            bail!("the daemon (pid {pid}) did not stop within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    outln!("stopped the agentvm daemon (pid {pid})");
    Ok(0)
}

pub fn bootstrap_user(app: &App, user: &str, backend: &str) -> Result<i32> {
    let fleet = app.fleet()?;
    let spec = fleet
        .backend(backend)
        .with_context(|| format!("{}: no [backends.{backend}]", fleet.file.display()))?;
    let token = crate::backend::proxmox::read_token(backend, &spec.proxmox.token)?;
    let made = crate::backend::proxmox::bootstrap_user(backend, &spec.proxmox, &token, user)?;
    if app.json {
        output::print_json(&made)?;
    } else {
        outln!(
            "user {} with pool {} (PVEVMAdmin) and token {}",
            made.user,
            made.pool,
            made.token_id
        );
        outln!("token (shown once, keep it secret): {}", made.token);
        outln!(
            "use it with: token = {{ env = \"PVE_TOKEN\" }}, pool = \"{}\"",
            made.pool
        );
    }
    Ok(0)
}
