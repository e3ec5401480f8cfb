//! `up`, `down`, `destroy` and `plan`.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Result, bail};

use super::{App, output};
use crate::backend::{DownPath, State};
use crate::protocol::{Answer, Op, Outcome, VmResult};

/// Sends `up` for `names` once every name is checked: each has a
/// `[vms.NAME]`, or is a VM that exists without one (a fork, or a VM whose
/// entry was removed), which starts as it was defined.
pub fn up_results(
    app: &App,
    names: &[String],
    wait_secs: Option<u64>,
    no_block: bool,
    backend: Option<String>,
) -> Result<Vec<VmResult>> {
    let fleet = app.fleet()?;
    // Every name is checked before anything is touched.
    let unlisted: Vec<String> = names
        .iter()
        .filter(|name| fleet.vm(name).is_err())
        .cloned()
        .collect();
    if !unlisted.is_empty() {
        for found in app.call(&unlisted, Op::Status, false)? {
            match &found.answer {
                Answer::Ok(Outcome::Status(row)) if row.state != State::Absent => {}
                Answer::Error { message, .. } => {
                    bail!("{}: not in the fleet file, and {message}", found.name)
                }
                _ => {
                    let missing = fleet.vm(&found.name).err().map(|e| e.to_string());
                    bail!(
                        "{}, and no VM of that name exists to start",
                        missing.unwrap_or_else(|| format!("no VM named {:?}", found.name))
                    );
                }
            }
        }
    }
    app.call(names, Op::Up { wait_secs, backend }, no_block)
}

pub fn up(
    app: &App,
    names: &[String],
    wait_secs: Option<u64>,
    no_block: bool,
    backend: Option<String>,
) -> Result<i32> {
    let fleet = app.fleet()?;
    let names: Vec<String> = if names.is_empty() {
        fleet.vms.keys().map(ToString::to_string).collect()
    } else {
        names.to_vec()
    };
    if names.is_empty() {
        bail!(
            "{} has no [vms.NAME]: nothing to start",
            fleet.file.display()
        );
    }
    let results = up_results(app, &names, wait_secs, no_block, backend)?;
    app.report(results, |name, outcome| {
        let Outcome::Up(up) = outcome else {
            return format!("{outcome:?}");
        };
        let mut line = match up.ssh_ready_seconds {
            Some(s) => format!("ssh ready in {s:.1}s"),
            None => format!("{} (not waiting for ssh)", up.action.text()),
        };
        if up.backend != crate::spec::LOCAL_BACKEND {
            line += &format!(" on {}", up.backend);
        }
        if up.restart_needed {
            line += "; restart needed: its spec changed while it ran (agentvm down, then up)";
        }
        format!("{line}; connect with: agentvm ssh {name}")
    })
}

pub fn down(app: &App, names: &[String], force: bool, timeout: u64, no_block: bool) -> Result<i32> {
    let names = if names.is_empty() {
        let names = existing_fleet_vms(app)?;
        if names.is_empty() {
            outln!(
                "no VM of {} exists: nothing to stop",
                app.fleet()?.file.display()
            );
            return Ok(0);
        }
        names
    } else {
        names.to_vec()
    };
    let op = Op::Down {
        force,
        timeout_secs: timeout,
    };
    let results = app.call(&names, op, no_block)?;
    app.report(results, |_, outcome| {
        match outcome {
            Outcome::Down { stopped_by } => match stopped_by {
                DownPath::AlreadyStopped => "already stopped",
                DownPath::Agent => "stopped by its guest agent (guest-shutdown)",
                DownPath::Acpi => "stopped by ACPI shutdown (power button)",
                DownPath::Forced if force => "forced off",
                DownPath::Forced => "did not shut down in time: forced off",
            },
            _ => "stopped",
        }
        .to_string()
    })
}

/// The VMs of the fleet file that exist on some backend.
fn existing_fleet_vms(app: &App) -> Result<Vec<String>> {
    app.fleet()?;
    let (rows, _) = super::status::all_rows(app)?;
    Ok(rows
        .into_iter()
        .filter(|r| r.in_spec && r.state != State::Absent)
        .map(|r| r.name)
        .collect())
}

pub fn destroy(
    app: &App,
    names: &[String],
    all: bool,
    yes: bool,
    no_block: bool,
    flatten: bool,
) -> Result<i32> {
    let names = match (all, names.is_empty()) {
        (false, true) => bail!(
            "destroy needs the names of the VMs to remove, or --all for every VM of the fleet file"
        ),
        (true, _) => {
            let names = existing_fleet_vms(app)?;
            if names.is_empty() {
                outln!(
                    "no VM of {} exists: nothing to destroy",
                    app.fleet()?.file.display()
                );
                return Ok(0);
            }
            names
        }
        (false, false) => names.to_vec(),
    };
    let names = &names;
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "refusing to destroy {} without --yes (not on a terminal)",
                names.join(", ")
            );
        }
        eprint!("Destroy {} (VM, disk and folder)? [y/N] ", names.join(", "));
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            errln!("nothing destroyed");
            return Ok(1);
        }
    }
    if flatten {
        let mut failed = false;
        for result in app.call(names, Op::Flatten, no_block)? {
            if let Answer::Error { message, .. } = &result.answer {
                failed = true;
                errln!(
                    "agentvm: error: {}",
                    output::vm_error(&result.name, message)
                );
            }
        }
        if failed {
            return Ok(1);
        }
    }
    let results = app.call(names, Op::Destroy, no_block)?;
    app.report(results, |_, _| "destroyed".to_string())
}

pub fn plan(app: &App, names: &[String], backend: Option<String>) -> Result<i32> {
    let fleet = app.fleet()?;
    let names: Vec<String> = if names.is_empty() {
        fleet.vms.keys().map(ToString::to_string).collect()
    } else {
        names.to_vec()
    };
    for name in &names {
        fleet.vm(name)?;
    }
    let results = app.call(&names, Op::Plan { backend }, false)?;
    let mut plans = Vec::new();
    let mut failed = false;
    for result in results {
        match result.answer {
            Answer::Ok(Outcome::Plan(plan)) => plans.push(plan),
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
    if app.json {
        output::print_json(&plans)?;
    } else {
        out!("{}", output::plan_text(&plans));
    }
    Ok(i32::from(failed))
}
