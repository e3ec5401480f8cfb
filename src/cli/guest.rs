//! Verbs that reach into a VM: `ssh`, `ssh-config`, `console`, `spice`, `exec`,
//! `hostkey`, `screenshot` and `snapshot`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{App, SnapshotCommand, one, output, status, stdout};
use crate::backend::{ForwardChange, SnapshotAction, Stream};
use crate::protocol::{Answer, Event, Op, Outcome};
use crate::ssh::Endpoint;

pub fn endpoint(app: &App, name: &str) -> Result<Endpoint> {
    match app.call_one(name, Op::SshEndpoint)? {
        Outcome::SshEndpoint(endpoint) => Ok(endpoint),
        other => bail!("{name}: unexpected answer {other:?}"),
    }
}

pub fn ssh(app: &App, name: &str, command: &[String]) -> Result<i32> {
    let err = endpoint(app, name)?.command(command).exec();
    Err(err).context("running ssh (is openssh-client installed?)")
}

pub fn ssh_config(app: &App, name: Option<&str>) -> Result<i32> {
    let names: Vec<String> = match name {
        Some(n) => vec![n.to_string()],
        None => status::existing_names(app)?,
    };
    let results = app.call(&names, Op::SshEndpoint, false)?;
    let mut failed = false;
    for result in results {
        match result.answer {
            Answer::Ok(Outcome::SshEndpoint(endpoint)) => out!("{}", endpoint.config_block()),
            Answer::Ok(other) => bail!("{}: unexpected answer {other:?}", result.name),
            Answer::Error { message, .. } => {
                failed = true;
                errln!(
                    "agentvm: error: {}",
                    output::vm_error(&result.name, &message)
                );
            }
        }
    }
    Ok(i32::from(failed))
}

pub fn console(app: &App, name: &str, follow: bool) -> Result<i32> {
    let path = match app.call_one(name, Op::SerialLog)? {
        Outcome::SerialLog { path } => path,
        other => bail!("{name}: unexpected answer {other:?}"),
    };
    let mut file = loop {
        match std::fs::File::open(&path) {
            Ok(f) => break f,
            Err(e) if follow && e.kind() == std::io::ErrorKind::NotFound => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n > 0 {
            stdout::write_bytes(&buf[..n]);
            if stdout::gone() {
                // Nobody reads any more: stop following.
                return Ok(0);
            }
            continue;
        }
        if !follow {
            return Ok(0);
        }
        // The log is appended across restarts; a shorter file means it was replaced.
        let pos = file.stream_position()?;
        if std::fs::metadata(&path).is_ok_and(|m| m.len() < pos) {
            file.seek(SeekFrom::Start(0))?;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn spice(app: &App, name: &str, open: bool) -> Result<i32> {
    let access = match app.call_one(name, Op::Spice)? {
        Outcome::Spice(access) => access,
        other => bail!("{name}: unexpected answer {other:?}"),
    };
    let target = match (&access.uri, &access.viewer_file) {
        (Some(uri), _) => uri.clone(),
        (None, Some(file)) => file.display().to_string(),
        (None, None) => bail!("{name}: the backend gave no SPICE address"),
    };
    if app.json {
        output::print_json(&serde_json::json!({
            "name": name,
            "uri": access.uri,
            "viewer_file": access.viewer_file,
        }))?;
    } else if access.uri.is_some() {
        outln!("{target}");
    } else {
        outln!("{target}");
        errln!(
            "{name}: remote-viewer connection file (0600, one-time ticket): remote-viewer {target}"
        );
    }
    if open {
        std::process::Command::new("remote-viewer")
            .arg(&target)
            .spawn()
            .context("starting remote-viewer (install virt-viewer)")?;
    }
    Ok(0)
}

/// The most `exec -i` passes to the guest command.
pub const MAX_EXEC_STDIN: usize = 64 * 1024;

pub fn exec(
    app: &App,
    name: &str,
    argv: Vec<String>,
    stdin: bool,
    stream: bool,
    timeout: u64,
) -> Result<i32> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let json = app.json;
    let stdin = if stdin {
        let mut input = Vec::new();
        std::io::stdin()
            .take(MAX_EXEC_STDIN as u64 + 1)
            .read_to_end(&mut input)
            .context("reading standard input")?;
        if input.len() > MAX_EXEC_STDIN {
            bail!(
                "exec -i: standard input is over {MAX_EXEC_STDIN} bytes (64 KiB); copy large files with scp over `agentvm ssh-config`"
            );
        }
        Some(input)
    } else {
        None
    };
    let op = Op::Exec {
        argv,
        stdin,
        timeout_secs: timeout,
        stream,
    };
    let results = app.call_with(&[name.to_string()], op, false, &mut |event| {
        if let Event::Output { stream, data, .. } = event {
            match (json, stream) {
                (true, Stream::Stdout) => out.extend_from_slice(&data),
                (true, Stream::Stderr) => err.extend_from_slice(&data),
                (false, Stream::Stdout) => stdout::write_bytes(&data),
                (false, Stream::Stderr) => {
                    let _ = std::io::stderr().write_all(&data);
                }
            }
        }
    })?;
    let outcome = match one(results, name)? {
        Outcome::Exec(outcome) => outcome,
        other => bail!("{name}: unexpected answer {other:?}"),
    };
    if json {
        output::print_json(&serde_json::json!({
            "name": name,
            "exit_code": outcome.exit_code,
            "signal": outcome.signal,
            "stdout": String::from_utf8_lossy(&out),
            "stderr": String::from_utf8_lossy(&err),
        }))?;
    }
    // The guest command's status is ours; a signal reads as 128+N, as in a shell.
    Ok(match (outcome.exit_code, outcome.signal) {
        (Some(code), _) => code as i32,
        (None, Some(signal)) => 128 + signal as i32,
        (None, None) => 1,
    })
}

pub fn hostkey(app: &App, name: &str) -> Result<i32> {
    let key = match app.call_one(name, Op::HostKey)? {
        Outcome::HostKey(key) => key,
        other => bail!("{name}: unexpected answer {other:?}"),
    };
    if key.source != "agent" {
        errln!(
            "{name}: no guest agent answered: the host key comes from an SSH key scan of its port"
        );
    }
    if app.json {
        output::print_json(&key)?;
    } else {
        outln!("{}", key.key);
        errln!(
            "{name}: pinned in {}; agentvm ssh now checks it strictly",
            key.known_hosts.display()
        );
    }
    Ok(0)
}

pub fn forward(
    app: &App,
    name: &str,
    mapping: Option<crate::spec::Forward>,
    remove: Option<u16>,
) -> Result<i32> {
    let change = match (mapping, remove) {
        (Some(forward), _) => ForwardChange::Add { forward },
        (None, Some(host_port)) => ForwardChange::Remove { host_port },
        (None, None) => ForwardChange::List,
    };
    let forwards = match app.call_one(name, Op::Forward { change })? {
        Outcome::Forwards { forwards } => forwards,
        other => bail!("{name}: unexpected answer {other:?}"),
    };
    if app.json {
        output::print_json(&forwards)?;
    } else if forwards.is_empty() {
        outln!("{name}: no forwards");
    } else {
        for f in &forwards {
            outln!(
                "{}:{} -> {name}:{}{}",
                f.host_addr,
                f.host_port,
                f.guest_port,
                if f.live {
                    " (live: gone at the next start)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(0)
}

pub fn screenshot(app: &App, name: &str, file: &Path) -> Result<i32> {
    // The daemon writes the file: give it a path that does not depend on its folder.
    let path =
        std::path::absolute(file).with_context(|| format!("resolving {}", file.display()))?;
    let (width, height) = match app.call_one(name, Op::Screenshot { path: path.clone() })? {
        Outcome::Screenshot { width, height } => (width, height),
        other => bail!("{name}: unexpected answer {other:?}"),
    };
    if app.json {
        output::print_json(&serde_json::json!({
            "name": name, "file": file, "width": width, "height": height,
        }))?;
    } else {
        outln!("{}: {width}x{height}", file.display());
    }
    Ok(0)
}

pub fn snapshot(app: &App, name: &str, command: SnapshotCommand, no_block: bool) -> Result<i32> {
    let action = match command {
        SnapshotCommand::Create { snapshot } => SnapshotAction::Create { name: snapshot },
        SnapshotCommand::List => SnapshotAction::List,
        SnapshotCommand::Revert { snapshot } => SnapshotAction::Revert { name: snapshot },
        SnapshotCommand::Delete { snapshot } => SnapshotAction::Delete { name: snapshot },
    };
    let op = Op::Snapshot {
        action: action.clone(),
    };
    let list = match one(app.call(&[name.to_string()], op, no_block)?, name)? {
        Outcome::Snapshots { snapshots } => snapshots,
        other => bail!("{name}: unexpected answer {other:?}"),
    };
    if app.json {
        output::print_json(&list)?;
        return Ok(0);
    }
    match &action {
        SnapshotAction::Create { .. } => outln!("{name}: snapshot taken"),
        SnapshotAction::Revert { name: snap } => outln!("{name}: reverted to {snap}"),
        SnapshotAction::Delete { name: snap } => outln!("{name}: deleted {snap}"),
        SnapshotAction::List => {}
    }
    for snap in &list {
        let when = crate::clock::format_time(
            std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(snap.created),
        );
        outln!("{:<24} {when} {}", snap.name, snap.state);
    }
    Ok(0)
}

pub fn sync_clock(app: &App, names: &[String]) -> Result<i32> {
    let results = app.call(names, Op::SyncClock, false)?;
    app.report(results, |_, outcome| match outcome {
        Outcome::ClockSynced { drift_ms } => format!(
            "clock set to the host's (it was {:+.3} s off)",
            *drift_ms as f64 / 1000.0
        ),
        _ => "clock set".to_string(),
    })
}

/// What a command run through the guest agent printed, and how it ended.
pub struct Captured {
    pub exit_code: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Captured {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// The end of its stderr (or stdout), for an error message.
    pub fn tail(&self) -> String {
        let text = if self.stderr.trim_ascii().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let text = String::from_utf8_lossy(text);
        let lines: Vec<&str> = text.trim().lines().rev().take(10).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

/// Runs `argv` in the guest through its agent and captures its output.
pub fn run_captured(app: &App, name: &str, argv: Vec<String>, timeout: u64) -> Result<Captured> {
    run_captured_with(app, name, argv, None, timeout)
}

/// `run_captured`, with `stdin` as the command's standard input.
pub fn run_captured_with(
    app: &App,
    name: &str,
    argv: Vec<String>,
    stdin: Option<Vec<u8>>,
    timeout: u64,
) -> Result<Captured> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let op = Op::Exec {
        argv,
        stdin,
        timeout_secs: timeout,
        stream: false,
    };
    let results = app.call_with(&[name.to_string()], op, false, &mut |event| {
        if let Event::Output { stream, data, .. } = event {
            match stream {
                Stream::Stdout => stdout.extend_from_slice(&data),
                Stream::Stderr => stderr.extend_from_slice(&data),
            }
        }
    })?;
    match one(results, name)? {
        Outcome::Exec(outcome) => Ok(Captured {
            exit_code: outcome.exit_code,
            stdout,
            stderr,
        }),
        other => bail!("{name}: unexpected answer {other:?}"),
    }
}
