//! The `agentvm` command: argument parsing, one small module per verb group,
//! output formatting. Every verb on VMs is one typed request to the daemon;
//! the CLI never looks at which backend a VM is on.

/// `println!` for the CLI's own output: a reader that has gone away
/// (`agentvm list | head -1`) is not a panic (see `stdout`). Defined before
/// the modules that use it.
macro_rules! outln {
    () => {
        $crate::cli::stdout::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::stdout::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` with the same handling as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::stdout::write(format_args!($($arg)*))
    };
}

/// `eprintln!` that ignores a standard error nobody reads.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::cli::stdout::write_err(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod args;
mod cp;
mod daemon_cmd;
mod deploy;
mod egress;
mod fork;
mod guest;
mod image;
mod lifecycle;
mod mcp;
mod nixos;
mod output;
mod retire;
mod setup;
mod status;
mod stdout;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;

use crate::backend::registry::{RemoteConfig, Secret};
use crate::client::Client;
use crate::paths::Home;
use crate::progress::{Console, Reporter};
use crate::protocol::{Answer, Event, Op, Outcome, Request, VmRef, VmResult};
use crate::spec::{Fleet, SpecError, VmSpec};
pub use args::{Cli, Command, ImageCommand, ProxmoxCommand, SecretsCommand, SnapshotCommand};

/// Runs the CLI; the return value is the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    crate::logging::init("warn");
    match run(cli) {
        Ok(code) => stdout::exit_code(code),
        Err(e) => {
            errln!("agentvm: error: {e:#}");
            1
        }
    }
}

struct App {
    json: bool,
    uri: String,
    home: Home,
    fleet: Option<Fleet>,
}

fn run(cli: Cli) -> Result<i32> {
    if let Command::Daemon {
        install_unit,
        stop,
        idle_exit,
    } = cli.command
    {
        return daemon_cmd::daemon(&cli.connect, install_unit, stop, &idle_exit);
    }
    if let Command::Mcp = cli.command {
        return mcp::serve(cli.file, cli.connect);
    }
    // These need neither a fleet file nor the daemon.
    match &cli.command {
        Command::Init => return setup::init(cli.file.as_deref(), &cli.connect, cli.json),
        Command::Completions { shell } => return setup::completions(*shell),
        Command::Man { out } => return setup::man(out.as_deref()),
        _ => {}
    }
    let needs_fleet = matches!(
        cli.command,
        Command::Up { .. }
            | Command::Plan { .. }
            | Command::Image { .. }
            | Command::New { .. }
            | Command::Provision { .. }
            | Command::Deploy { .. }
            | Command::Retire { .. }
            | Command::Secrets { .. }
            | Command::Proxmox { .. }
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
        } => lifecycle::up(
            &app,
            &names,
            (!no_wait).then_some(timeout),
            no_block,
            backend,
        ),
        Command::Down {
            names,
            force,
            timeout,
            no_block,
        } => lifecycle::down(&app, &names, force, timeout, no_block),
        Command::Fork {
            source,
            new,
            no_wait,
            new_identity,
            timeout,
            no_block,
        } => fork::fork(
            &app,
            &source,
            &new,
            (!no_wait).then_some(timeout),
            new_identity,
            no_block,
        ),
        Command::Destroy {
            names,
            all,
            yes,
            no_block,
            flatten,
        } => lifecycle::destroy(&app, &names, all, yes, no_block, flatten),
        Command::Plan { names, backend } => lifecycle::plan(&app, &names, backend),
        Command::List => status::status(&app, &[]),
        Command::Status { names } => status::status(&app, &names),
        Command::Inventory => status::inventory(&app),
        Command::Events => status::events(&app),
        Command::Ssh { name, command } => guest::ssh(&app, &name, &command),
        Command::SshConfig { name } => guest::ssh_config(&app, name.as_deref()),
        Command::Console { name, no_follow } => guest::console(&app, &name, !no_follow),
        Command::Spice { name, open } => guest::spice(&app, &name, open),
        Command::SyncClock { names } => guest::sync_clock(&app, &names),
        Command::Forward {
            name,
            mapping,
            remove,
        } => guest::forward(&app, &name, mapping, remove),
        Command::Egress { name } => egress::show(&app, &name),
        Command::Exec {
            name,
            timeout,
            stdin,
            stream,
            command,
        } => guest::exec(&app, &name, command, stdin, stream, timeout),
        Command::Cp {
            recursive,
            via,
            src,
            dst,
        } => cp::cp(&app, recursive, via, &src, &dst),
        Command::Hostkey { name } => guest::hostkey(&app, &name),
        Command::Screenshot { name, png } => guest::screenshot(&app, &name, &png),
        Command::Snapshot {
            name,
            action,
            no_block,
        } => guest::snapshot(&app, &name, action, no_block),
        Command::New { name, image } => nixos::new_agent(&app, &name, image.as_deref()),
        Command::Provision { name, dry_run } => nixos::provision(&app, &name, dry_run),
        Command::Deploy {
            names,
            dry_run,
            identity,
            timeout,
        } => deploy::deploy(&app, &names, dry_run, identity, timeout),
        Command::Retire {
            name,
            yes,
            purge_config,
            identity,
        } => retire::retire(&app, &name, yes, purge_config, identity),
        Command::Secrets {
            command:
                SecretsCommand::Rekey {
                    name,
                    identity,
                    host_key,
                    remove,
                },
        } => nixos::secrets_rekey(&app, &name, identity, host_key, remove),
        Command::Image {
            command: ImageCommand::Build { name, rebuild },
        } => nixos::image_build(&app, &name, rebuild),
        Command::Image {
            command: ImageCommand::Push { name, backend },
        } => image::push(&app, &name, &backend),
        Command::Proxmox {
            command: ProxmoxCommand::BootstrapUser { user, backend },
        } => daemon_cmd::bootstrap_user(&app, &user, &backend),
        Command::Daemon { .. }
        | Command::Mcp
        | Command::Init
        | Command::Completions { .. }
        | Command::Man { .. } => {
            unreachable!("handled above")
        }
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

    fn daemon(&self) -> Result<Client> {
        let pass_env: Vec<String> = self
            .fleet
            .iter()
            .flat_map(|f| f.vms.values())
            .flat_map(|spec| spec.pass_env.iter().cloned())
            .collect();
        Client::connect_or_start(&self.home, &self.uri, &pass_env)
    }

    /// The fleet file's `[backends.NAME]` with their tokens read. A backend
    /// whose token cannot be read is left out with a warning, unless one of
    /// `needed` names it: then it is an error.
    fn remote_configs(&self, needed: &[&str]) -> Result<Vec<RemoteConfig>> {
        let Some(fleet) = &self.fleet else {
            return Ok(Vec::new());
        };
        let mut configs = Vec::new();
        for (name, spec) in &fleet.backends {
            match crate::backend::proxmox::read_token(name.as_str(), &spec.proxmox.token) {
                Ok(token) => configs.push(RemoteConfig {
                    spec: spec.clone(),
                    token: Secret::new(token),
                }),
                Err(e) if needed.contains(&name.as_str()) => return Err(e),
                Err(e) => errln!(
                    "agentvm: warning: {e:#}; VMs on backend {name} are not looked at by this command"
                ),
            }
        }
        Ok(configs)
    }

    fn vm_ref(&self, name: &str) -> VmRef {
        let spec = self.spec(name).cloned();
        let image = match (&self.fleet, &spec) {
            (Some(fleet), Some(spec)) => fleet.image_of(spec).ok().cloned(),
            _ => None,
        };
        VmRef {
            name: name.to_string(),
            spec,
            image,
        }
    }

    /// Sends `op` on `names` to the daemon, showing its events as they come:
    /// steps and byte progress on stderr, or JSON lines on stderr with `--json`.
    fn call(&self, names: &[String], op: Op, no_block: bool) -> Result<Vec<VmResult>> {
        let console = Console::new(false);
        let json = self.json;
        self.call_with(names, op, no_block, &mut |event| {
            show_event(&console, json, event)
        })
    }

    /// `call`, with the events going to `on_event`.
    fn call_with(
        &self,
        names: &[String],
        op: Op,
        no_block: bool,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Vec<VmResult>> {
        let mut needed: Vec<&str> = names
            .iter()
            .filter_map(|n| self.spec(n).map(|s| s.backend.as_str()))
            .collect();
        if let Op::Up {
            backend: Some(b), ..
        }
        | Op::Plan { backend: Some(b) } = &op
        {
            needed.push(b);
        }
        let mut vms: Vec<VmRef> = names.iter().map(|n| self.vm_ref(n)).collect();
        if matches!(op, Op::Up { .. }) {
            // Only `up` starts guests, so only it reads the pass_env variables;
            // their values go over the private socket, never onto a command line.
            for vm in &mut vms {
                if let Some(spec) = vm.spec.take() {
                    vm.spec = Some(
                        spec.with_passed_env(|var| std::env::var(var).ok())
                            .map_err(anyhow::Error::msg)?,
                    );
                }
            }
        }
        let request = Request::Vms {
            backends: self.remote_configs(&needed)?,
            vms,
            action: op,
            no_block,
        };
        self.daemon()?.call(request, on_event)
    }

    /// `op` on one VM; its outcome, or its error as this command's error.
    fn call_one(&self, name: &str, op: Op) -> Result<Outcome> {
        one(self.call(&[name.to_string()], op, false)?, name)
    }

    /// Prints per-VM results: a line each (from `line`), or one JSON array of
    /// the successes; failures go to stderr. The exit code is 1 if any failed.
    fn report(
        &self,
        results: Vec<VmResult>,
        line: impl Fn(&str, &Outcome) -> String,
    ) -> Result<i32> {
        let mut failures = 0;
        let mut values = Vec::new();
        for result in results {
            match &result.answer {
                Answer::Ok(outcome) => {
                    if self.json {
                        values.push(output::outcome_json(&result.name, outcome)?);
                    } else {
                        outln!("{}: {}", result.name, line(&result.name, outcome));
                    }
                }
                Answer::Error { message, .. } => {
                    failures += 1;
                    errln!(
                        "agentvm: error: {}",
                        output::vm_error(&result.name, message)
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
            errln!("{line}");
        }
        return;
    }
    match event {
        Event::Step { vm, step } => console.step(&vm, &step),
        Event::Bytes { label, done, total } => console.bytes(&label, done, total),
        Event::BytesDone { label } => console.bytes_done(&label),
        Event::Output { .. } => {}
        Event::Lifecycle {
            vm,
            backend,
            state,
            at,
        } => {
            let when = crate::clock::format_time(
                std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(at),
            );
            outln!("{when} {vm} {state} ({backend})");
        }
        Event::Problem {
            vm,
            backend,
            problem,
            at,
        } => {
            let when = crate::clock::format_time(
                std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(at),
            );
            outln!("{when} {vm} problem ({backend}): {problem}");
        }
    }
}

/// Names mapped to the specs the fleet file has for them.
fn fleet_specs(app: &App) -> BTreeMap<String, VmSpec> {
    app.fleet
        .as_ref()
        .map(|f| {
            f.vms
                .iter()
                .map(|(n, s)| (n.to_string(), s.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The outcome of a one-VM request, or its error as this command's error.
fn one(mut results: Vec<VmResult>, name: &str) -> Result<Outcome> {
    let result = results.pop().context("the daemon returned no result")?;
    match result.answer {
        Answer::Ok(outcome) => Ok(outcome),
        Answer::Error { message, .. } => bail!("{}", output::vm_error(name, &message)),
    }
}
