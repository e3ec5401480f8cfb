//! The `agentvm` command: argument parsing and one function per verb.

mod args;
mod output;

use std::io::{BufRead, IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde::Serialize;

use crate::backend::libvirt::LocalBackend;
use crate::backend::{Backend, BackendError, DownPath, State, UpOutcome, VmStatus};
use crate::fsutil::FileLock;
use crate::paths::Home;
use crate::progress::Console;
use crate::spec::{Fleet, SpecError};
pub use args::{Cli, Command};

/// Runs the CLI; the return value is the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentvm: error: {e:#}");
            1
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

struct App {
    cli_json: bool,
    fleet: Option<Fleet>,
    backend: LocalBackend,
}

fn run(cli: Cli) -> Result<i32> {
    let needs_fleet = matches!(cli.command, Command::Up { .. });
    let fleet = load_fleet(cli.file.as_deref(), needs_fleet)?;
    let home = Home::from_env()?;
    let backend = LocalBackend::connect(&cli.connect, home)?;
    let ctx = App {
        cli_json: cli.json,
        fleet,
        backend,
    };
    match cli.command {
        Command::Up {
            names,
            no_wait,
            timeout,
        } => up(&ctx, &names, !no_wait, Duration::from_secs(timeout)),
        Command::Down {
            names,
            force,
            timeout,
        } => down(&ctx, &names, force, Duration::from_secs(timeout)),
        Command::Destroy { names, yes } => destroy(&ctx, &names, yes),
        Command::List => status(&ctx, None),
        Command::Status { name } => status(&ctx, name.as_deref()),
        Command::Ssh { name, command } => ssh(&ctx, &name, &command),
        Command::SshConfig { name } => ssh_config(&ctx, name.as_deref()),
        Command::Console { name, no_follow } => console(&ctx, &name, !no_follow),
        Command::Spice { name, open } => spice(&ctx, &name, open),
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

    fn spec(&self, name: &str) -> Option<&crate::spec::VmSpec> {
        self.fleet.as_ref().and_then(|f| f.vms.get(name))
    }

    fn lock(&self) -> Result<FileLock> {
        FileLock::acquire(&crate::paths::lock_file()?)
    }

    fn status(&self, name: &str) -> Result<VmStatus, BackendError> {
        self.backend.status(name, self.spec(name))
    }

    /// Refuses `action` on a readonly VM (by its spec, or its metadata when it has no spec).
    fn check_writable(&self, name: &str, action: &'static str) -> Result<VmStatus, BackendError> {
        let status = self.status(name)?;
        if status.readonly {
            return Err(BackendError::ReadOnly {
                name: name.to_string(),
                action,
            });
        }
        Ok(status)
    }
}

#[derive(Serialize)]
struct UpResult {
    #[serde(flatten)]
    outcome: UpOutcome,
    /// Seconds from the end of `up` until SSH answered (when waited for).
    ssh_ready_seconds: Option<f64>,
}

fn up(ctx: &App, names: &[String], wait: bool, timeout: Duration) -> Result<i32> {
    let fleet = ctx.fleet()?;
    // Every name is checked before anything is touched.
    let specs = names
        .iter()
        .map(|n| fleet.vm(n))
        .collect::<Result<Vec<_>, _>>()?;
    let progress = Console::new(ctx.cli_json);
    let mut failures = 0;
    let mut started = Vec::new();
    {
        let _lock = ctx.lock()?;
        for spec in &specs {
            match ctx.backend.up(spec, fleet.image(&spec.image), &progress) {
                Ok(outcome) => started.push(outcome),
                Err(e) => {
                    failures += 1;
                    eprintln!(
                        "agentvm: error: {}: {:#}",
                        spec.name,
                        anyhow::Error::from(e)
                    );
                }
            }
        }
    }
    let mut results = Vec::new();
    for outcome in started {
        let ready = if wait {
            match ctx.backend.wait_ready(&outcome.name, timeout) {
                Ok(took) => Some(took.as_secs_f64()),
                Err(e) => {
                    failures += 1;
                    eprintln!("agentvm: error: {:#}", anyhow::Error::from(e));
                    continue;
                }
            }
        } else {
            None
        };
        if !ctx.cli_json {
            let mut line = format!("{}: ", outcome.name);
            match ready {
                Some(s) => line += &format!("ssh ready in {s:.1}s"),
                None => line += "started (not waiting for ssh)",
            }
            if outcome.restart_needed {
                line += "; restart needed: its spec changed while it ran (agentvm down, then up)";
            }
            println!("{line}; connect with: agentvm ssh {}", outcome.name);
        }
        results.push(UpResult {
            outcome,
            ssh_ready_seconds: ready,
        });
    }
    if ctx.cli_json {
        output::print_json(&results)?;
    }
    Ok(i32::from(failures > 0))
}

#[derive(Serialize)]
struct VmResult<T: Serialize> {
    name: String,
    #[serde(flatten)]
    result: T,
}

/// Runs `op` on each VM in turn: a line per VM (or one JSON array at the end),
/// errors reported as they come. The exit code is 1 if any VM failed.
fn each_vm<T: Serialize>(
    ctx: &App,
    names: &[String],
    op: impl Fn(&str) -> Result<T, BackendError>,
    line: impl Fn(&T) -> String,
) -> Result<i32> {
    let mut failures = 0;
    let mut results = Vec::new();
    for name in names {
        match op(name) {
            Ok(result) => {
                if !ctx.cli_json {
                    println!("{name}: {}", line(&result));
                }
                results.push(VmResult {
                    name: name.clone(),
                    result,
                });
            }
            Err(e) => {
                failures += 1;
                eprintln!("agentvm: error: {name}: {:#}", anyhow::Error::from(e));
            }
        }
    }
    if ctx.cli_json {
        output::print_json(&results)?;
    }
    Ok(i32::from(failures > 0))
}

#[derive(Serialize)]
struct Stopped {
    stopped_by: DownPath,
}

fn down(ctx: &App, names: &[String], force: bool, timeout: Duration) -> Result<i32> {
    let _lock = ctx.lock()?;
    each_vm(
        ctx,
        names,
        |name| {
            ctx.check_writable(name, "stop")?;
            let stopped_by = ctx.backend.down(name, force, timeout)?;
            Ok(Stopped { stopped_by })
        },
        |r| {
            match r.stopped_by {
                DownPath::AlreadyStopped => "already stopped",
                DownPath::Acpi => "stopped by ACPI shutdown",
                DownPath::Forced if force => "forced off",
                DownPath::Forced => "did not shut down in time: forced off",
            }
            .to_string()
        },
    )
}

#[derive(Serialize)]
struct Destroyed {
    destroyed: bool,
}

fn destroy(ctx: &App, names: &[String], yes: bool) -> Result<i32> {
    for name in names {
        ctx.check_writable(name, "destroy")?;
    }
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
    let _lock = ctx.lock()?;
    each_vm(
        ctx,
        names,
        |name| {
            ctx.backend.destroy(name)?;
            Ok(Destroyed { destroyed: true })
        },
        |_| "destroyed".to_string(),
    )
}

/// Every VM: those in the fleet file (absent ones included) and those the backend has.
fn all_statuses(ctx: &App) -> Result<Vec<VmStatus>> {
    let mut rows: Vec<VmStatus> = Vec::new();
    if let Some(fleet) = &ctx.fleet {
        for name in fleet.vms.keys() {
            rows.push(ctx.status(name.as_str())?);
        }
    }
    for row in ctx.backend.list()? {
        if !rows.iter().any(|r| r.name == row.name) {
            rows.push(row);
        }
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

fn status(ctx: &App, name: Option<&str>) -> Result<i32> {
    let rows = match name {
        Some(name) => {
            let row = ctx.status(name)?;
            if row.state == State::Absent && !row.in_spec {
                bail!("no VM named {name:?} in agentvm.toml or libvirt");
            }
            vec![row]
        }
        None => all_statuses(ctx)?,
    };
    if ctx.cli_json {
        output::print_json(&rows)?;
    } else {
        print!("{}", output::status_table(&rows));
    }
    Ok(0)
}

fn ssh(ctx: &App, name: &str, command: &[String]) -> Result<i32> {
    let endpoint = ctx.backend.ssh_endpoint(name)?;
    let err = endpoint.command(command).exec();
    Err(err).context("running ssh (is openssh-client installed?)")
}

fn ssh_config(ctx: &App, name: Option<&str>) -> Result<i32> {
    let names: Vec<String> = match name {
        Some(n) => vec![n.to_string()],
        None => ctx.backend.list()?.into_iter().map(|s| s.name).collect(),
    };
    for name in names {
        print!("{}", ctx.backend.ssh_endpoint(&name)?.config_block());
    }
    Ok(0)
}

fn console(ctx: &App, name: &str, follow: bool) -> Result<i32> {
    let path = ctx.backend.serial_log(name)?;
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

fn spice(ctx: &App, name: &str, open: bool) -> Result<i32> {
    let uri = ctx.backend.spice_uri(name)?;
    if ctx.cli_json {
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
