//! The `agentvm` command: argument parsing and one function per verb. Verbs that
//! change VMs go through the daemon; the others read libvirt directly.

mod args;
mod output;

use std::io::{BufRead, IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::backend::libvirt::LocalBackend;
use crate::backend::{Backend, SnapshotAction, State, Stream, VmStatus};
use crate::client::Client;
use crate::daemon::protocol::{Event, Request, UpItem, VmRef, VmResult};
use crate::paths::Home;
use crate::progress::{Console, Reporter};
use crate::spec::{Fleet, SpecError, VmSpec};
pub use args::{Cli, Command, ImageCommand, ProxmoxCommand, SecretsCommand, SnapshotCommand};

/// Runs the CLI; the return value is the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging(matches!(cli.command, Command::Daemon { .. }));
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentvm: error: {e:#}");
            1
        }
    }
}

fn init_logging(daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

struct App {
    json: bool,
    uri: String,
    home: Home,
    fleet: Option<Fleet>,
}

fn run(cli: Cli) -> Result<i32> {
    if let Command::Daemon { install_unit, stop } = cli.command {
        return daemon(&cli.connect, install_unit, stop);
    }
    let needs_fleet = matches!(
        cli.command,
        Command::Up { .. }
            | Command::Image { .. }
            | Command::New { .. }
            | Command::Provision { .. }
    );
    let app = App {
        json: cli.json,
        uri: cli.connect,
        home: Home::from_env()?,
        fleet: load_fleet(cli.file.as_deref(), needs_fleet)?,
    };
    match cli.command {
        Command::Up {
            names,
            no_wait,
            timeout,
            no_block,
            backend,
        } => up(
            &app,
            &names,
            !no_wait,
            timeout,
            no_block,
            backend.as_deref(),
        ),
        Command::Down {
            names,
            force,
            timeout,
            no_block,
        } => down(&app, &names, force, timeout, no_block),
        Command::Destroy {
            names,
            yes,
            no_block,
        } => destroy(&app, &names, yes, no_block),
        Command::List => status(&app, None),
        Command::Status { name } => status(&app, name.as_deref()),
        Command::Ssh { name, command } => ssh(&app, &name, &command),
        Command::SshConfig { name } => ssh_config(&app, name.as_deref()),
        Command::Console { name, no_follow } => console(&app, &name, !no_follow),
        Command::Spice { name, open } => spice(&app, &name, open),
        Command::Events => events(&app),
        Command::Inventory => inventory(&app),
        Command::New { name } => new_agent(&app, &name),
        Command::Plan { names, backend } => plan(&app, &names, backend.as_deref()),
        Command::Proxmox {
            command: ProxmoxCommand::BootstrapUser { user, backend },
        } => bootstrap_user(&app, &user, &backend),
        Command::Secrets {
            command:
                SecretsCommand::Rekey {
                    name,
                    identity,
                    host_key,
                    remove,
                },
        } => secrets_rekey(&app, &name, identity, host_key, remove),
        Command::Provision { name, dry_run } => provision(&app, &name, dry_run),
        Command::Image {
            command: ImageCommand::Build { name, rebuild },
        } => image_build(&app, &name, rebuild),
        Command::Exec {
            name,
            timeout,
            command,
        } => exec(&app, &name, &command, timeout),
        Command::Hostkey { name } => hostkey(&app, &name),
        Command::Screenshot { name, png } => screenshot(&app, &name, &png),
        Command::Snapshot {
            name,
            action,
            no_block,
        } => snapshot(&app, &name, action, no_block),
        Command::Daemon { .. } => unreachable!("handled above"),
    }
}

/// The fleet file, if there is one. A file that exists but is broken is always an error.
fn load_fleet(explicit: Option<&std::path::Path>, required: bool) -> Result<Option<Fleet>> {
    match Fleet::locate(explicit) {
        Ok(path) => Ok(Some(Fleet::load(&path)?)),
        Err(SpecError::NotFound { .. }) if !required => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl App {
    fn fleet(&self) -> Result<&Fleet> {
        self.fleet
            .as_ref()
            .context("no agentvm.toml found (use --file or AGENTVM_FILE)")
    }

    fn spec(&self, name: &str) -> Option<&VmSpec> {
        self.fleet.as_ref().and_then(|f| f.vms.get(name))
    }

    fn backend(&self) -> Result<LocalBackend> {
        LocalBackend::connect(&self.uri, self.home.clone())
    }

    fn daemon(&self) -> Result<Client> {
        Client::connect_or_start(&self.home, &self.uri)
    }

    /// The Proxmox backend named `name` in the fleet file.
    fn remote(&self, name: &str) -> Result<crate::backend::proxmox::ProxmoxBackend> {
        let spec = self
            .fleet
            .as_ref()
            .and_then(|f| f.backend(name))
            .with_context(|| format!("no [backends.{name}] in agentvm.toml"))?;
        crate::backend::proxmox::ProxmoxBackend::connect(name, &spec.proxmox, self.home.clone())
    }

    fn check_backend_name(&self, name: &str) -> Result<()> {
        let fleet = self.fleet()?;
        if name != crate::spec::LOCAL_BACKEND && fleet.backend(name).is_none() {
            bail!(
                "no backend named {name:?} (available: local{})",
                fleet
                    .backends
                    .keys()
                    .map(|k| format!(", {k}"))
                    .collect::<String>()
            );
        }
        Ok(())
    }

    /// Names on the local backend, and (name, backend) pairs on others.
    fn split_by_backend(&self, names: &[String]) -> (Vec<String>, Vec<(String, String)>) {
        let mut local = Vec::new();
        let mut remote = Vec::new();
        for name in names {
            match self.spec(name) {
                Some(spec) if spec.backend != crate::spec::LOCAL_BACKEND => {
                    remote.push((name.clone(), spec.backend.clone()));
                }
                _ => local.push(name.clone()),
            }
        }
        (local, remote)
    }

    fn check_remote_writable(
        &self,
        backend: &crate::backend::proxmox::ProxmoxBackend,
        name: &str,
        action: &'static str,
    ) -> Result<()> {
        if backend.status(name, self.spec(name))?.readonly {
            return Err(crate::backend::BackendError::ReadOnly {
                name: name.to_string(),
                action,
            }
            .into());
        }
        Ok(())
    }

    fn refs(&self, names: &[String]) -> Vec<VmRef> {
        names
            .iter()
            .map(|name| VmRef {
                name: name.clone(),
                spec: self.spec(name).cloned(),
            })
            .collect()
    }

    /// Sends a request to the daemon, showing its events as they come: steps
    /// and byte progress on stderr, or JSON lines on stderr with `--json`.
    fn call(&self, request: Request) -> Result<Vec<VmResult>> {
        let console = Console::new(false);
        let json = self.json;
        self.daemon()?
            .call(request, &mut |event| show_event(&console, json, event))
    }

    /// Prints per-VM results: a line each (from `line`), or one JSON array of
    /// the successes; failures go to stderr. The exit code is 1 if any failed.
    fn report(
        &self,
        results: Vec<VmResult>,
        line: impl Fn(&serde_json::Value) -> String,
    ) -> Result<i32> {
        let mut failures = 0;
        let mut values = Vec::new();
        for result in results {
            match (result.ok, result.error) {
                (Some(mut value), _) => {
                    if !self.json {
                        println!("{}: {}", result.name, line(&value));
                    }
                    if let Some(object) = value.as_object_mut() {
                        object
                            .entry("name")
                            .or_insert_with(|| result.name.clone().into());
                    }
                    values.push(value);
                }
                (None, error) => {
                    failures += 1;
                    eprintln!(
                        "agentvm: error: {}: {}",
                        result.name,
                        error.unwrap_or_else(|| "failed".into())
                    );
                }
            }
        }
        if self.json {
            output::print_json(&values)?;
        }
        Ok(i32::from(failures > 0))
    }
}

fn show_event(console: &Console, json: bool, event: Event) {
    if json {
        if let Ok(line) = serde_json::to_string(&event) {
            eprintln!("{line}");
        }
        return;
    }
    match event {
        Event::Step { vm, step } => console.step(&vm, &step),
        Event::Bytes { label, done, total } => console.bytes(&label, done, total),
        Event::BytesDone { label } => console.bytes_done(&label),
        Event::Lifecycle { vm, state, at } => {
            let when = crate::daemon::locks::format_time(
                std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(at),
            );
            println!("{when} {vm} {state}");
        }
    }
}

fn up(
    app: &App,
    names: &[String],
    wait: bool,
    timeout: u64,
    no_block: bool,
    backend: Option<&str>,
) -> Result<i32> {
    let fleet = app.fleet()?;
    // Every name is checked before anything is touched.
    let mut vms = Vec::new();
    let mut remote = Vec::new();
    for n in names {
        let mut spec = fleet.vm(n)?.clone();
        if let Some(b) = backend {
            app.check_backend_name(b)?;
            spec.backend = b.to_string();
        }
        let spec = &spec;
        if spec.backend == crate::spec::LOCAL_BACKEND {
            vms.push(UpItem {
                spec: spec.clone(),
                image: fleet.image_of(spec)?.clone(),
            });
        } else {
            remote.push(spec.clone());
        }
    }
    let mut results = if vms.is_empty() {
        Vec::new()
    } else {
        app.call(Request::Up {
            vms,
            wait,
            timeout_secs: timeout,
            no_block,
        })?
    };
    let console = Console::new(app.json);
    for spec in remote {
        let result = app.remote(&spec.backend).and_then(|backend| {
            let outcome = backend.up(&spec, None, &console)?;
            let ready = if wait {
                Some(
                    backend
                        .wait_ready(spec.name.as_str(), Duration::from_secs(timeout))?
                        .as_secs_f64(),
                )
            } else {
                None
            };
            Ok(serde_json::to_value(crate::daemon::UpResult {
                outcome,
                ssh_ready_seconds: ready,
            })?)
        });
        results.push(VmResult::from_result(spec.name.as_str(), result));
    }
    app.report(results, |v| {
        let mut line = match v["ssh_ready_seconds"].as_f64() {
            Some(s) => format!("ssh ready in {s:.1}s"),
            None => format!(
                "{} (not waiting for ssh)",
                v["action"].as_str().unwrap_or("started")
            ),
        };
        if v["restart_needed"] == true {
            line += "; restart needed: its spec changed while it ran (agentvm down, then up)";
        }
        let name = v["name"].as_str().unwrap_or_default();
        format!("{line}; connect with: agentvm ssh {name}")
    })
}

fn down(app: &App, names: &[String], force: bool, timeout: u64, no_block: bool) -> Result<i32> {
    let (local, remote) = app.split_by_backend(names);
    let mut results = if local.is_empty() {
        Vec::new()
    } else {
        app.call(Request::Down {
            vms: app.refs(&local),
            force,
            timeout_secs: timeout,
            no_block,
        })?
    };
    for (name, backend) in remote {
        let result = app.remote(&backend).and_then(|b| {
            app.check_remote_writable(&b, &name, "stop")?;
            let stopped_by = b.down(&name, force, Duration::from_secs(timeout))?;
            Ok(serde_json::json!({ "stopped_by": stopped_by }))
        });
        results.push(VmResult::from_result(&name, result));
    }
    app.report(results, |v| {
        match v["stopped_by"].as_str() {
            Some("already-stopped") => "already stopped",
            Some("agent") => "stopped by its guest agent (guest-shutdown)",
            Some("acpi") => "stopped by ACPI shutdown (system_powerdown)",
            _ if force => "forced off",
            _ => "did not shut down in time: forced off",
        }
        .to_string()
    })
}

fn destroy(app: &App, names: &[String], yes: bool, no_block: bool) -> Result<i32> {
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "refusing to destroy {} without --yes (not on a terminal)",
                names.join(", ")
            );
        }
        eprint!(
            "Destroy {} (domain, disk and folder)? [y/N] ",
            names.join(", ")
        );
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing destroyed");
            return Ok(1);
        }
    }
    let (local, remote) = app.split_by_backend(names);
    let mut results = if local.is_empty() {
        Vec::new()
    } else {
        app.call(Request::Destroy {
            vms: app.refs(&local),
            no_block,
        })?
    };
    for (name, backend) in remote {
        let result = app.remote(&backend).and_then(|b| {
            app.check_remote_writable(&b, &name, "destroy")?;
            b.destroy(&name)?;
            Ok(serde_json::json!({ "destroyed": true }))
        });
        results.push(VmResult::from_result(&name, result));
    }
    app.report(results, |_| "destroyed".to_string())
}

/// Every VM: those in the fleet file (absent ones included) and those the backend has.
fn all_statuses(app: &App, backend: &LocalBackend) -> Result<Vec<VmStatus>> {
    let mut rows: Vec<VmStatus> = Vec::new();
    let mut remote_lists = Vec::new();
    if let Some(fleet) = &app.fleet {
        for backend_name in fleet.backends.keys() {
            match app
                .remote(backend_name.as_str())
                .and_then(|b| Ok(b.list()?))
            {
                Ok(list) => remote_lists.extend(list),
                Err(e) => eprintln!("agentvm: warning: backend {backend_name}: {e:#}"),
            }
        }
        for (name, spec) in &fleet.vms {
            if spec.backend == crate::spec::LOCAL_BACKEND {
                rows.push(backend.status(name.as_str(), Some(spec))?);
            } else if let Some(mut row) = remote_lists
                .iter()
                .find(|r| r.name == name.as_str())
                .cloned()
            {
                row.in_spec = true;
                row.readonly = spec.readonly;
                row.purpose = spec.purpose.clone();
                rows.push(row);
            } else {
                rows.push(VmStatus {
                    name: name.to_string(),
                    state: State::Absent,
                    backend: spec.backend.clone(),
                    ssh_port: None,
                    spice_port: None,
                    image: None,
                    readonly: spec.readonly,
                    restart_needed: false,
                    in_spec: true,
                    purpose: spec.purpose.clone(),
                    ips: Vec::new(),
                    agent: "stopped".into(),
                });
            }
        }
    }
    for row in remote_lists {
        if !rows.iter().any(|r| r.name == row.name) {
            rows.push(row);
        }
    }
    for row in backend.list()? {
        if !rows.iter().any(|r| r.name == row.name) {
            rows.push(row);
        }
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

fn status(app: &App, name: Option<&str>) -> Result<i32> {
    let backend = app.backend()?;
    let rows = match name {
        Some(name) => {
            let row = match app
                .spec(name)
                .filter(|s| s.backend != crate::spec::LOCAL_BACKEND)
            {
                Some(spec) => app.remote(&spec.backend)?.status(name, Some(spec))?,
                None => backend.status(name, app.spec(name))?,
            };
            if row.state == State::Absent && !row.in_spec {
                bail!("no VM named {name:?} in agentvm.toml or libvirt");
            }
            vec![row]
        }
        None => all_statuses(app, &backend)?,
    };
    if app.json {
        output::print_json(&rows)?;
    } else {
        print!("{}", output::status_table(&rows));
    }
    Ok(0)
}

fn ssh(app: &App, name: &str, command: &[String]) -> Result<i32> {
    let endpoint = match app
        .spec(name)
        .filter(|s| s.backend != crate::spec::LOCAL_BACKEND)
    {
        Some(spec) => app.remote(&spec.backend)?.ssh_endpoint(name)?,
        None => app.backend()?.ssh_endpoint(name)?,
    };
    let err = endpoint.command(command).exec();
    Err(err).context("running ssh (is openssh-client installed?)")
}

fn ssh_config(app: &App, name: Option<&str>) -> Result<i32> {
    let backend = app.backend()?;
    let names: Vec<String> = match name {
        Some(n) => vec![n.to_string()],
        None => backend.list()?.into_iter().map(|s| s.name).collect(),
    };
    for name in names {
        print!("{}", backend.ssh_endpoint(&name)?.config_block());
    }
    Ok(0)
}

fn console(app: &App, name: &str, follow: bool) -> Result<i32> {
    let path = match app
        .spec(name)
        .filter(|s| s.backend != crate::spec::LOCAL_BACKEND)
    {
        Some(spec) => app.remote(&spec.backend)?.serial_log(name)?,
        None => app.backend()?.serial_log(name)?,
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
    let mut stdout = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n > 0 {
            stdout.write_all(&buf[..n])?;
            stdout.flush()?;
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

fn spice(app: &App, name: &str, open: bool) -> Result<i32> {
    let uri = match app
        .spec(name)
        .filter(|s| s.backend != crate::spec::LOCAL_BACKEND)
    {
        Some(spec) => app.remote(&spec.backend)?.spice_uri(name)?,
        None => app.backend()?.spice_uri(name)?,
    };
    if app.json {
        output::print_json(&serde_json::json!({ "name": name, "uri": uri }))?;
    } else {
        println!("{uri}");
    }
    if open {
        std::process::Command::new("remote-viewer")
            .arg(&uri)
            .spawn()
            .context("starting remote-viewer (install virt-viewer)")?;
    }
    Ok(0)
}

fn events(app: &App) -> Result<i32> {
    let console = Console::new(false);
    let json = app.json;
    let mut client = app.daemon()?;
    client.follow_events(&mut |event| {
        if json {
            if let Ok(line) = serde_json::to_string(&event) {
                println!("{line}");
            }
        } else {
            show_event(&console, false, event);
        }
    })?;
    Ok(0)
}

fn daemon(uri: &str, install_unit: bool, stop: bool) -> Result<i32> {
    if install_unit {
        let path = crate::daemon::unit_path()?;
        let exe = std::env::current_exe().context("finding the agentvm executable")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        crate::fsutil::write_atomic(&path, crate::daemon::unit_text(&exe, uri).as_bytes(), 0o644)?;
        println!("wrote {}", path.display());
        println!(
            "enable it with: systemctl --user daemon-reload && systemctl --user enable --now agentvm"
        );
        return Ok(0);
    }
    if stop {
        return stop_daemon();
    }
    crate::daemon::run(uri)?;
    Ok(0)
}

fn stop_daemon() -> Result<i32> {
    let socket = crate::paths::socket_path()?;
    let Some(pid) = crate::daemon::running_pid(&socket) else {
        println!("no agentvm daemon is running");
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
    println!("stopped the agentvm daemon (pid {pid})");
    Ok(0)
}

fn exec(app: &App, name: &str, command: &[String], timeout: u64) -> Result<i32> {
    let backend = app.backend()?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let json = app.json;
    let outcome = backend.exec(
        name,
        command,
        Duration::from_secs(timeout),
        &mut |stream, bytes| match (json, stream) {
            (true, Stream::Stdout) => out.extend_from_slice(bytes),
            (true, Stream::Stderr) => err.extend_from_slice(bytes),
            (false, Stream::Stdout) => {
                let _ = std::io::stdout().write_all(bytes);
                let _ = std::io::stdout().flush();
            }
            (false, Stream::Stderr) => {
                let _ = std::io::stderr().write_all(bytes);
            }
        },
    )?;
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

fn hostkey(app: &App, name: &str) -> Result<i32> {
    let key = app.backend()?.host_key(name)?;
    if key.source != "agent" {
        eprintln!(
            "{name}: no guest agent answered: the host key comes from an SSH key scan of its port"
        );
    }
    if app.json {
        output::print_json(&key)?;
    } else {
        println!("{}", key.key);
        eprintln!(
            "{name}: pinned in {}; agentvm ssh now checks it strictly",
            key.known_hosts.display()
        );
    }
    Ok(0)
}

fn screenshot(app: &App, name: &str, file: &std::path::Path) -> Result<i32> {
    let (width, height) = app.backend()?.screenshot(name, file)?;
    if app.json {
        output::print_json(&serde_json::json!({
            "name": name, "file": file, "width": width, "height": height,
        }))?;
    } else {
        println!("{}: {width}x{height}", file.display());
    }
    Ok(0)
}

fn snapshot(app: &App, name: &str, command: SnapshotCommand, no_block: bool) -> Result<i32> {
    let action = match command {
        SnapshotCommand::Create { snapshot } => SnapshotAction::Create { name: snapshot },
        SnapshotCommand::List => SnapshotAction::List,
        SnapshotCommand::Revert { snapshot } => SnapshotAction::Revert { name: snapshot },
        SnapshotCommand::Delete { snapshot } => SnapshotAction::Delete { name: snapshot },
    };
    let list = if action == SnapshotAction::List {
        app.backend()?.snapshot(name, &action)?
    } else {
        let mut results = app.call(Request::Snapshot {
            vm: Box::new(app.refs(&[name.to_string()]).remove(0)),
            action: action.clone(),
            no_block,
        })?;
        let result = results.pop().context("the daemon returned no result")?;
        match (result.ok, result.error) {
            (Some(value), _) => {
                serde_json::from_value(value).context("reading the snapshot list")?
            }
            (None, error) => bail!("{name}: {}", error.unwrap_or_default()),
        }
    };
    if app.json {
        output::print_json(&list)?;
    } else {
        match &action {
            SnapshotAction::Create { .. } => println!("{name}: snapshot taken"),
            SnapshotAction::Revert { name: snap } => println!("{name}: reverted to {snap}"),
            SnapshotAction::Delete { name: snap } => println!("{name}: deleted {snap}"),
            SnapshotAction::List => {}
        }
        for snap in &list {
            let when = crate::daemon::locks::format_time(
                std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(snap.created),
            );
            println!("{:<24} {when} {}", snap.name, snap.state);
        }
    }
    Ok(0)
}

fn inventory(app: &App) -> Result<i32> {
    let backend = app.backend()?;
    let rows: Vec<output::InventoryRow> = all_statuses(app, &backend)?
        .into_iter()
        .map(|s| {
            let spec = app.spec(&s.name);
            output::InventoryRow {
                cpus: spec.map(|v| v.cpus),
                memory: spec.map(|v| v.memory.to_string()),
                disk: spec.and_then(|v| v.disk).map(|d| d.to_string()),
                name: s.name,
                backend: s.backend,
                image: s.image,
                ssh_port: s.ssh_port,
                spice_port: s.spice_port,
                state: s.state.as_str().to_string(),
                purpose: s.purpose,
            }
        })
        .collect();
    if app.json {
        output::print_json(&rows)?;
    } else {
        print!("{}", output::inventory_markdown(&rows));
    }
    Ok(0)
}

fn image_build(app: &App, name: &str, rebuild: bool) -> Result<i32> {
    let fleet = app.fleet()?;
    let image = fleet
        .images
        .get(name)
        .with_context(|| format!("{}: no image named {name:?}", fleet.file.display()))?
        .clone();
    let results = app.call(Request::ImageBuild { image, rebuild })?;
    app.report(results, |v| {
        let digest = v["digest"].as_str().unwrap_or_default();
        if v["built"] == true {
            format!("built and imported as {digest}")
        } else {
            format!("up to date ({digest})")
        }
    })
}

fn new_agent(app: &App, name: &str) -> Result<i32> {
    let fleet = app.fleet()?;
    let name = crate::spec::Name::new(name)?;
    // Reserve ports no VM has, defined or pinned in the fleet file.
    let mut claims = app.backend()?.port_claims()?;
    for vm in fleet.vms.values() {
        for port in [vm.ssh_port, vm.spice_port].into_iter().flatten() {
            claims.add(port, vm.name.as_str());
        }
    }
    let ssh = crate::ports::choose(
        "ssh",
        crate::ports::SSH_PORT_BASE,
        name.as_str(),
        None,
        None,
        &claims,
    )?;
    claims.add(ssh, &format!("{name} (ssh)"));
    let spice = crate::ports::choose(
        "spice",
        crate::ports::SPICE_PORT_BASE,
        name.as_str(),
        None,
        None,
        &claims,
    )?;
    let made = crate::scaffold::scaffold(fleet, &name, ssh, spice)?;
    if app.json {
        output::print_json(&made)?;
    } else {
        println!(
            "{name}: wrote {} and added [vms.{name}] to {} (ssh port {ssh}, spice port {spice})",
            made.host_config.display(),
            fleet.file.display()
        );
    }
    Ok(0)
}

fn provision(app: &App, name: &str, dry_run: bool) -> Result<i32> {
    let fleet = app.fleet()?;
    let spec = fleet.vm(name)?;
    let endpoint = app.backend()?.ssh_endpoint(name)?;
    let mut cmd = crate::provision::command(&fleet.file, name, spec.nixos.as_deref(), &endpoint)?;
    if dry_run {
        println!("{}", crate::provision::shell_line(&cmd));
        return Ok(0);
    }
    // Output streams straight through: nixos-rebuild's own progress is what the user wants.
    let status = cmd.status().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow::anyhow!(
            "{} is not installed (it comes with Nix/NixOS); --dry-run shows the command",
            cmd.get_program().to_string_lossy()
        ),
        _ => anyhow::Error::new(e).context("running nixos-rebuild"),
    })?;
    Ok(status.code().unwrap_or(1))
}

fn secrets_rekey(
    app: &App,
    name: &str,
    identity: Option<std::path::PathBuf>,
    host_key: Option<std::path::PathBuf>,
    remove: bool,
) -> Result<i32> {
    let fleet = app.fleet()?;
    let spec = fleet.vm(name)?;
    app.home.ensure()?;
    if spec.secrets.is_empty() {
        bail!("{}: vms.{name} has no secrets", fleet.file.display());
    }
    let identity = match identity {
        Some(path) => path,
        None => std::path::PathBuf::from(
            crate::paths::non_empty_env("HOME").context("HOME is not set: give --identity")?,
        )
        .join(".ssh/id_ed25519"),
    };
    let key = if remove {
        None
    } else if let Some(path) = host_key {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Some(text)
    } else {
        let pinned = app.home.vm_pinned_host_key(name);
        match std::fs::read_to_string(&pinned) {
            Ok(text) => Some(text),
            Err(_) => Some(app.backend()?.host_key(name)?.key),
        }
    };
    let key = key
        .map(|k| crate::ssh::public_key_of(&k))
        .transpose()
        .context("the host key")?;
    let fleet_dir = fleet
        .file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let report = crate::secrets::rekey(
        name,
        &spec.secrets,
        fleet_dir,
        key.as_deref(),
        &identity,
        &app.home.secrets_record(),
    )?;
    if app.json {
        output::print_json(&report)?;
    } else {
        let verb = if remove { "removed" } else { "added" };
        println!("{name}: {verb} recipient {}", report.recipient);
        for file in &report.rekeyed {
            println!("  re-encrypted {}", file.display());
        }
        for file in &report.edited {
            println!("  edited {}", file.display());
        }
        for file in &report.sops_files {
            println!(
                "  run `sops updatekeys {}` to re-encrypt it",
                file.display()
            );
        }
    }
    for (file, why) in &report.failed {
        eprintln!("agentvm: error: {}: left as it was: {why}", file.display());
    }
    Ok(i32::from(!report.failed.is_empty()))
}

fn plan(app: &App, names: &[String], backend_override: Option<&str>) -> Result<i32> {
    let fleet = app.fleet()?;
    let names: Vec<String> = if names.is_empty() {
        fleet.vms.keys().map(ToString::to_string).collect()
    } else {
        names.to_vec()
    };
    let local = app.backend()?;
    let mut plans = Vec::new();
    for name in &names {
        let mut spec = fleet.vm(name)?.clone();
        if let Some(b) = backend_override {
            app.check_backend_name(b)?;
            spec.backend = b.to_string();
        }
        let plan = if spec.backend == crate::spec::LOCAL_BACKEND {
            local.plan(&spec, fleet.image_of(&spec).ok())?
        } else {
            app.remote(&spec.backend)?.plan(&spec, None)?
        };
        plans.push(plan);
    }
    if app.json {
        output::print_json(&plans)?;
        return Ok(0);
    }
    for plan in &plans {
        let what = if plan.create {
            "create"
        } else if plan.changes.is_empty() && plan.resize.is_none() {
            if plan.start { "start" } else { "no changes" }
        } else {
            "update"
        };
        println!("{} ({}): {what}", plan.name, plan.backend);
        for change in &plan.changes {
            match &change.old {
                None => println!("  + {} = {}", change.key, change.new),
                Some(old) => println!("  ~ {}: {old} -> {}", change.key, change.new),
            }
        }
        if let Some(size) = &plan.resize {
            println!("  grow disk to {size}");
        }
        if plan.start && what != "start" {
            println!("  start");
        }
        if plan.restart_needed {
            println!("  (running: a restart applies this)");
        }
    }
    Ok(0)
}

fn bootstrap_user(app: &App, user: &str, backend: &str) -> Result<i32> {
    let made = app.remote(backend)?.bootstrap_user(user)?;
    if app.json {
        output::print_json(&made)?;
    } else {
        println!(
            "user {} with pool {} (PVEVMAdmin) and token {}",
            made.user, made.pool, made.token_id
        );
        println!("token (shown once, keep it secret): {}", made.token);
        println!(
            "use it with: token = {{ env = \"PVE_TOKEN\" }}, pool = \"{}\"",
            made.pool
        );
    }
    Ok(0)
}
