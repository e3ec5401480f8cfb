//! `list`, `status`, `inventory` and `events`.

use anyhow::{Result, bail};

use super::{App, fleet_specs, output, show_event};
use crate::backend::{State, VmStatus};
use crate::progress::Console;
use crate::protocol::{Answer, Op, Outcome, Request};

/// Every VM of every backend and of the fleet file. Backends that could not be
/// listed are named on stderr, and the exit code says so.
pub fn all_rows(app: &App) -> Result<(Vec<VmStatus>, bool)> {
    let request = Request::List {
        backends: app.remote_configs(&[])?,
        specs: fleet_specs(app).into_values().collect(),
    };
    let (rows, failed) = app.daemon()?.list(request)?;
    for failure in &failed {
        errln!(
            "agentvm: error: backend {} could not be listed (its VMs are not shown): {}",
            failure.backend,
            failure.error
        );
    }
    Ok((rows, !failed.is_empty()))
}

/// The status of the VM `name`; an error if neither the fleet file nor any backend has it.
pub fn one_row(app: &App, name: &str) -> Result<VmStatus> {
    let row = match app.call_one(name, Op::Status)? {
        Outcome::Status(row) => *row,
        other => bail!("{name}: unexpected answer {other:?}"),
    };
    if row.state == State::Absent && !row.in_spec {
        bail!("no VM named {name:?} in agentvm.toml or on any backend");
    }
    Ok(row)
}

/// `names`' rows, or with none every VM as `list` shows them.
pub fn status(app: &App, names: &[String]) -> Result<i32> {
    let (rows, failed) = if names.is_empty() {
        all_rows(app)?
    } else {
        let mut rows = Vec::new();
        let mut failed = false;
        for result in app.call(names, Op::Status, false)? {
            let name = &result.name;
            match result.answer {
                Answer::Ok(Outcome::Status(row)) if row.state == State::Absent && !row.in_spec => {
                    failed = true;
                    errln!(
                        "agentvm: error: no VM named {name:?} in agentvm.toml or on any backend"
                    );
                }
                Answer::Ok(Outcome::Status(row)) => rows.push(*row),
                Answer::Ok(other) => bail!("{name}: unexpected answer {other:?}"),
                Answer::Error { message, .. } => {
                    failed = true;
                    errln!("agentvm: error: {}", output::vm_error(name, &message));
                }
            }
        }
        (rows, failed)
    };
    if app.json {
        output::print_json(&rows)?;
    } else if !rows.is_empty() || names.is_empty() {
        out!("{}", output::status_table(&rows));
    }
    Ok(i32::from(failed))
}

pub fn inventory(app: &App) -> Result<i32> {
    let (rows, failed) = all_rows(app)?;
    let rows: Vec<output::InventoryRow> = rows
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
        out!("{}", output::inventory_markdown(&rows));
    }
    Ok(i32::from(failed))
}

pub fn events(app: &App) -> Result<i32> {
    let console = Console::new(false);
    let json = app.json;
    let request = Request::Events {
        backends: app.remote_configs(&[])?,
    };
    app.daemon()?.follow_events(request, &mut |event| {
        if json {
            if let Ok(line) = serde_json::to_string(&event) {
                outln!("{line}");
            }
        } else {
            show_event(&console, false, event);
        }
        if super::stdout::gone() {
            // Nobody reads any more: nothing else to finish.
            std::process::exit(super::stdout::exit_code(0));
        }
    })?;
    Ok(0)
}

/// The names of every VM some backend has (for `ssh-config` without a name).
pub fn existing_names(app: &App) -> Result<Vec<String>> {
    let (rows, _) = all_rows(app)?;
    Ok(rows
        .into_iter()
        .filter(|r| r.state != State::Absent)
        .map(|r| r.name)
        .collect())
}
