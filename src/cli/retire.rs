//! `agentvm retire NAME`: a deploy undone, step by step: the VM destroyed, its
//! key taken out of the secrets (and the secrets re-encrypted without it), its
//! pinned host key and deploy record forgotten, its inventory row dropped; its
//! host config stays unless `--purge-config`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::{App, output};
use crate::backend::State;
use crate::deploy::tools::{failures, paths, sops_files, sops_updatekeys};
use crate::deploy::{Status, inventory};
use crate::protocol::{Op, Outcome};
use crate::spec::VmSpec;
use crate::spec::fleet_dir;

/// One step of a retire.
#[derive(Debug, Serialize)]
pub struct RetireStep {
    pub step: &'static str,
    pub status: Status,
    pub detail: String,
    pub ms: u64,
}

#[derive(Debug, Serialize)]
pub struct Retired {
    pub name: String,
    pub steps: Vec<RetireStep>,
    pub failed: Option<&'static str>,
}

type StepResult = Result<(Status, String)>;

pub fn retire(
    app: &App,
    name: &str,
    yes: bool,
    purge_config: bool,
    identity: Option<PathBuf>,
) -> Result<i32> {
    let fleet = app.fleet()?;
    let spec = fleet.vm(name)?.clone();
    let identity = crate::secrets::admin_identity(identity)?;
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!("refusing to retire {name} without --yes (not on a terminal)");
        }
        eprint!(
            "Retire {name}: destroy the VM and its disk, and take its key out of its secrets? [y/N] "
        );
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            errln!("nothing retired");
            return Ok(1);
        }
    }
    let mut retired = Retired {
        name: name.to_string(),
        steps: Vec::new(),
        failed: None,
    };
    let steps: [(&'static str, &dyn Fn() -> StepResult); 5] = [
        ("destroy", &|| destroy(app, name)),
        ("secrets", &|| secrets(app, &spec, &identity)),
        ("host-key", &|| forget(app, &spec)),
        ("inventory", &|| {
            let file = inventory::path(&fleet.file);
            Ok(if inventory::update(&file, name, None)? {
                (
                    Status::Changed,
                    format!("dropped its row from {}", file.display()),
                )
            } else {
                (
                    Status::Unchanged,
                    format!("{} does not list it", file.display()),
                )
            })
        }),
        ("config", &|| config(app, &spec, purge_config)),
    ];
    for (step, run) in steps {
        let started = Instant::now();
        let (status, detail) = match run() {
            Ok(done) => done,
            Err(e) => (Status::Failed, format!("{e:#}")),
        };
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if !app.json {
            outln!(
                "{name}: {step}: {} ({:.1} s): {detail}",
                status.text(),
                ms as f64 / 1000.0
            );
        }
        // Work left undone (sops) stops it too: what follows (the config
        // above all) must stay until the VM's key has lost every access.
        let failed = matches!(status, Status::Failed | Status::Left);
        retired.steps.push(RetireStep {
            step,
            status,
            detail,
            ms,
        });
        if failed {
            retired.failed = Some(step);
            break;
        }
    }
    if app.json {
        output::print_json(&retired)?;
    } else if let Some(step) = retired.failed {
        outln!("{name}: stopped at step {step}; fix it and run agentvm retire {name} again");
    } else {
        outln!("{name}: retired");
    }
    Ok(i32::from(retired.failed.is_some()))
}

fn destroy(app: &App, name: &str) -> StepResult {
    let Outcome::Status(status) = app.call_one(name, Op::Status)? else {
        bail!("unexpected answer to status");
    };
    if status.state == State::Absent {
        return Ok((Status::Unchanged, "no such VM on any backend".to_string()));
    }
    app.call_one(name, Op::Destroy)?;
    Ok((
        Status::Changed,
        format!(
            "destroyed (it was {} on {})",
            status.state.as_str(),
            status.backend
        ),
    ))
}

fn secrets(app: &App, spec: &VmSpec, identity: &std::path::Path) -> StepResult {
    let name = spec.name.as_str();
    let record = app.home.secrets_record();
    let known = crate::secrets::read_added(&record)?.contains_key(name);
    if spec.secrets.is_empty() && !known {
        return Ok((Status::Skipped, format!("vms.{name} has no secrets")));
    }
    let fleet = app.fleet()?;
    let mut done = Vec::new();
    let mut sops = sops_files(spec);
    if known {
        let report = crate::secrets::rekey(
            name,
            &spec.secrets,
            fleet_dir(&fleet.file),
            None,
            identity,
            &record,
        )?;
        if !report.failed.is_empty() {
            bail!("left as they were: {}", failures(&report));
        }
        done.push(format!("removed {}", report.recipient));
        if !report.edited.is_empty() {
            done.push(format!("from {}", paths(&report.edited)));
        }
        if !report.rekeyed.is_empty() {
            done.push(format!("re-encrypted {}", paths(&report.rekeyed)));
        }
        for file in report.sops_files {
            if !sops.contains(&file) {
                sops.push(file);
            }
        }
    } else {
        done.push("agentvm has no key of it in any secrets".to_string());
    }
    if !sops.is_empty() {
        match sops_updatekeys(fleet_dir(&fleet.file), &sops)? {
            Err(program) => {
                done.push(format!(
                    "`{program}` is not installed to re-encrypt without its key: run sops updatekeys -y {}, then agentvm retire {name} again",
                    paths(&sops)
                ));
                // The record stays, so the next retire redoes this.
                return Ok((Status::Left, done.join("; ")));
            }
            Ok(changed) if !changed.is_empty() => {
                done.push(format!("sops re-encrypted {}", paths(&changed)));
            }
            Ok(_) => {}
        }
    }
    if !known {
        let status = if done.len() > 1 {
            Status::Changed
        } else {
            Status::Unchanged
        };
        return Ok((status, done.join("; ")));
    }
    crate::secrets::forget(name, &record)?;
    Ok((Status::Changed, done.join("; ")))
}

/// The pinned host key, the VM's known_hosts and its deploy record.
fn forget(app: &App, spec: &VmSpec) -> StepResult {
    let name = spec.name.as_str();
    let mut removed = Vec::new();
    // A Proxmox VM's pinned key lives under remote/<backend>/NAME.
    let remote = app
        .home
        .root()
        .join(crate::paths::REMOTE_DIR)
        .join(&spec.backend)
        .join(name);
    if spec.backend != crate::spec::LOCAL_BACKEND && remote.is_dir() {
        std::fs::remove_dir_all(&remote)
            .with_context(|| format!("removing {}", remote.display()))?;
        removed.push(remote);
    }
    for file in [
        app.home.vm_pinned_host_key(name),
        app.home.vm_known_hosts(name),
        app.home.deploy_state(name),
    ] {
        match std::fs::remove_file(&file) {
            Ok(()) => removed.push(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", file.display())),
        }
    }
    if removed.is_empty() {
        Ok((
            Status::Unchanged,
            "nothing pinned left (it went with the VM)".to_string(),
        ))
    } else {
        Ok((Status::Changed, format!("removed {}", paths(&removed))))
    }
}

/// The files `agentvm new NAME` made, and `[vms.NAME]`, with `--purge-config`.
fn config(app: &App, spec: &VmSpec, purge: bool) -> StepResult {
    let fleet = app.fleet()?;
    let name = spec.name.as_str();
    let folder = fleet_dir(&fleet.file).join(format!("hosts/agent-{name}"));
    let host_attr = format!("#agent-{name}");
    let sharing: Vec<&str> = fleet
        .vms
        .values()
        .filter(|vm| vm.name.as_str() != name)
        .filter(|vm| vm.nixos.as_deref().is_some_and(|n| n.ends_with(&host_attr)))
        .map(|vm| vm.name.as_str())
        .collect();
    if !purge {
        return Ok((
            Status::Skipped,
            format!(
                "kept {} and [vms.{name}] (--purge-config removes them)",
                folder.display()
            ),
        ));
    }
    let text = std::fs::read_to_string(&fleet.file)
        .with_context(|| format!("reading {}", fleet.file.display()))?;
    let edited =
        remove_vm(&text, name).with_context(|| format!("editing {}", fleet.file.display()))?;
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    // The home-manager and user files `new` wrote (their first line says so).
    let dir = fleet_dir(&fleet.file);
    for folder in crate::scaffold::HOME_MANAGER_DIRS
        .iter()
        .chain(crate::scaffold::USER_MODULE_DIRS)
    {
        let file = dir.join(folder).join(format!("agent-{name}.nix"));
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        if text
            .lines()
            .next()
            .is_some_and(|l| l.contains(&format!("agentvm new {name}")))
        {
            std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
            removed.push(file);
        } else {
            kept.push(file);
        }
    }
    if !sharing.is_empty() {
        kept.push(folder.clone());
    } else if folder.is_dir() {
        std::fs::remove_dir_all(&folder)
            .with_context(|| format!("removing {}", folder.display()))?;
        removed.push(folder);
    }
    if edited != text {
        crate::fsutil::write_atomic_keep_mode(&fleet.file, edited.as_bytes(), 0o644)?;
        removed.push(PathBuf::from(format!(
            "[vms.{name}] of {}",
            fleet.file.display()
        )));
    }
    let kept = if kept.is_empty() {
        String::new()
    } else if sharing.is_empty() {
        format!("; kept {} (agentvm new did not write them)", paths(&kept))
    } else {
        format!(
            "; kept {} (agentvm new did not write them, or {} use it too)",
            paths(&kept),
            sharing.join(", ")
        )
    };
    if removed.is_empty() {
        return Ok((
            Status::Unchanged,
            format!("nothing agentvm new made of it was left{kept}"),
        ));
    }
    Ok((
        Status::Changed,
        format!("removed {}{kept}", paths(&removed)),
    ))
}

/// The fleet file's text without `[vms.NAME]` (and the comments right above
/// it), everything else as written.
fn remove_vm(text: &str, name: &str) -> Result<String> {
    let mut doc: toml_edit::DocumentMut = text.parse().context("parsing it for editing")?;
    if let Some(vms) = doc.get_mut("vms").and_then(|v| v.as_table_like_mut()) {
        vms.remove(name);
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_a_vm_keeps_the_rest_as_written() {
        // The comments right above its table go with it.
        let text = "# fleet\n[vms.luce] # the other\nimage = \"y\"\n\n# the builder\n[vms.drago]\nimage = \"x\" # mine\n";
        assert_eq!(
            remove_vm(text, "drago").unwrap(),
            "# fleet\n[vms.luce] # the other\nimage = \"y\"\n"
        );
        assert_eq!(remove_vm(text, "nope").unwrap(), text);
    }
}
