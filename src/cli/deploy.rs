//! `agentvm deploy` and `agentvm retire`: the new-agent flow as steps over the
//! daemon's verbs (`up`, `hostkey`, `exec`, …) and the fleet's files. Each
//! step first looks whether its work is already done, so a second deploy
//! changes nothing, and a failed step is recorded so the next deploy says it
//! resumes there. Works for VMs on any backend: every VM call is a request.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};

use super::{App, guest, output};
use crate::backend::UpAction;
use crate::deploy::tools::{
    failures, fingerprint, git_add, paths, sops_files, sops_updatekeys, ssh_output, ssh_run,
};
use crate::deploy::{
    DeployState, Failure, Status, Step, StepReport, VmDeploy, inventory, nixos, now_secs, step_line,
};
use crate::protocol::{Op, Outcome};
use crate::spec::VmSpec;
use crate::spec::fleet_dir;

/// What the steps of one VM's deploy share.
struct Run<'a> {
    app: &'a App,
    spec: &'a VmSpec,
    identity: PathBuf,
    timeout: u64,
    state: DeployState,
    ports: (Option<u16>, Option<u16>),
    backend: String,
    host_key: Option<String>,
    /// The host key came from the guest agent (not an SSH key scan).
    key_from_agent: bool,
    /// sops files an old host key was taken out of (for the sops step).
    extra_sops: Vec<PathBuf>,
}

type StepResult = Result<(Status, String)>;

pub fn deploy(
    app: &App,
    names: &[String],
    dry_run: bool,
    identity: Option<PathBuf>,
    timeout: u64,
) -> Result<i32> {
    let fleet = app.fleet()?;
    // Every name is checked before anything is touched.
    let specs: Vec<&VmSpec> = names
        .iter()
        .map(|n| fleet.vm(n))
        .collect::<std::result::Result<_, _>>()?;
    let identity = crate::secrets::admin_identity(identity)?;
    let mut reports = Vec::new();
    for spec in specs {
        let name = spec.name.as_str();
        let state_path = app.home.deploy_state(name);
        let state = DeployState::read(&state_path)?;
        let resumed_at = state.failed.as_ref().map(|f| f.step);
        if let Some(failed) = &state.failed
            && !app.json
        {
            errln!(
                "{name}: resuming at step {} (it failed {}: {}); the steps before it only check",
                failed.step,
                crate::clock::format_time(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(failed.at)
                ),
                failed.error
            );
        }
        let report = if dry_run {
            plan(app, spec, &identity, timeout, resumed_at)
        } else {
            let mut run = Run {
                app,
                spec,
                identity: identity.clone(),
                timeout,
                state,
                ports: (None, None),
                backend: spec.backend.clone(),
                host_key: None,
                key_from_agent: false,
                extra_sops: Vec::new(),
            };
            let report = run.all(resumed_at);
            run.state.write(&state_path)?;
            report
        };
        if !app.json {
            let left: Vec<String> = report
                .steps
                .iter()
                .filter(|s| s.status == Status::Left)
                .map(|s| s.step.to_string())
                .collect();
            let left = if left.is_empty() {
                String::new()
            } else {
                format!(" (left to do: {})", left.join(", "))
            };
            let summary = match (report.failed, dry_run, report.changed) {
                (Some(step), _, _) => format!(
                    "stopped at step {step}; fix it and run agentvm deploy {name} again to resume there"
                ),
                (None, true, _) => "nothing was changed (--dry-run)".to_string(),
                (None, false, true) => format!("deployed{left}"),
                (None, false, false) => format!("already deployed: nothing changed{left}"),
            };
            outln!("{name}: {summary}");
        }
        reports.push(report);
    }
    if app.json {
        output::print_json(&reports)?;
    }
    Ok(i32::from(reports.iter().any(|r| r.failed.is_some())))
}

impl Run<'_> {
    fn all(&mut self, resumed_at: Option<Step>) -> VmDeploy {
        let name = self.spec.name.to_string();
        let mut report = VmDeploy::new(&name, resumed_at);
        for step in Step::ALL {
            let started = Instant::now();
            let result = match step {
                Step::Up => self.up(),
                Step::HostKey => self.host_key(),
                Step::Secrets => self.secrets(),
                Step::Sops => self.sops(),
                Step::Nixos => self.nixos(),
                Step::Tailscale => self.tailscale(),
                Step::Inventory => self.inventory(),
            };
            let mut line = match result {
                Ok((status, detail)) => StepReport::new(step, status, detail),
                Err(e) => StepReport::new(step, Status::Failed, format!("{e:#}")),
            };
            line.ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            if !self.app.json {
                outln!("{}", step_line(&name, &line));
            }
            let failed = line.status == Status::Failed;
            if failed {
                self.state.failed = Some(Failure {
                    step,
                    error: line.detail.clone(),
                    at: now_secs(),
                });
            }
            report.push(line);
            if failed {
                return report;
            }
        }
        if self.state.failed.take().is_some() || report.changed {
            self.state.deployed_at = Some(now_secs());
        }
        report
    }

    fn name(&self) -> &str {
        self.spec.name.as_str()
    }

    fn up(&mut self) -> StepResult {
        let op = Op::Up {
            wait_secs: Some(self.timeout),
            backend: None,
        };
        let Outcome::Up(up) = self.app.call_one(self.name(), op)? else {
            bail!("unexpected answer to up");
        };
        self.ports = (up.ssh_port, up.spice_port);
        self.backend = up.backend.clone();
        let mut detail = match up.ssh_ready_seconds {
            Some(s) => format!("{}; ssh ready in {s:.1} s", up.action.text()),
            None => up.action.text().to_string(),
        };
        if up.restart_needed {
            detail +=
                "; its spec changed while it ran: agentvm down, then deploy again, applies it";
        }
        let status = if up.action == UpAction::AlreadyRunning {
            Status::Unchanged
        } else {
            Status::Changed
        };
        Ok((status, detail))
    }

    fn host_key(&mut self) -> StepResult {
        let Outcome::HostKey(key) = self.app.call_one(self.name(), Op::HostKey)? else {
            bail!("unexpected answer to hostkey");
        };
        let public = crate::ssh::public_key_of(&key.key).context("the guest's host key")?;
        let print = fingerprint(&public)?;
        let mut detail = format!("{print} pinned in {}", key.known_hosts.display());
        if key.source != "agent" {
            detail += " (read by an SSH key scan: the guest agent did not answer)";
        }
        let status = match &self.state.host_key {
            Some(old) if *old == public => Status::Unchanged,
            Some(old) => {
                detail += &format!(" (it was {} before)", fingerprint(old)?);
                Status::Changed
            }
            None => Status::Changed,
        };
        self.state.host_key = Some(public.clone());
        self.host_key = Some(public);
        self.key_from_agent = key.source == "agent";
        Ok((status, detail))
    }

    fn secrets(&mut self) -> StepResult {
        let name = self.name().to_string();
        if self.spec.secrets.is_empty() {
            return Ok((Status::Skipped, format!("vms.{name} has no secrets")));
        }
        let key = self.host_key.clone().context("no host key was read")?;
        let fleet = self.app.fleet()?;
        let record = self.app.home.secrets_record();
        let recorded = crate::secrets::read_added(&record)?
            .get(&name)
            .is_some_and(|added| added.ssh.starts_with(&format!("{} ", key.trim())));
        // A key the user gave it by hand (`secrets rekey --host-key`) is theirs to vouch for.
        if !self.key_from_agent && !recorded {
            bail!(
                "its host key was read by an SSH key scan (no guest agent answered), which anyone on the path could answer: \
                 check it, then give it its secrets with agentvm secrets rekey {name} --host-key FILE"
            );
        }
        let mut done = Vec::new();
        // A guest whose host key changed: its old key loses access first.
        if let Some(added) = crate::secrets::read_added(&record)?.get(&name)
            && !added.ssh.starts_with(&format!("{} ", key.trim()))
        {
            let removed = crate::secrets::rekey(
                &name,
                &self.spec.secrets,
                fleet_dir(&fleet.file),
                None,
                &self.identity,
                &record,
            )?;
            if !removed.failed.is_empty() {
                bail!("taking its old key out: {}", failures(&removed));
            }
            done.push(format!(
                "took its old key out of {}",
                paths(&removed.edited)
            ));
            self.extra_sops = removed.sops_files;
        }
        let report = crate::secrets::rekey(
            &name,
            &self.spec.secrets,
            fleet_dir(&fleet.file),
            Some(&key),
            &self.identity,
            &record,
        )?;
        if !report.failed.is_empty() {
            bail!("left as they were: {}", failures(&report));
        }
        if !report.edited.is_empty() {
            done.push(format!("added its key to {}", paths(&report.edited)));
        }
        if !report.rekeyed.is_empty() {
            done.push(format!("re-encrypted {}", paths(&report.rekeyed)));
        }
        if done.is_empty() {
            let ages = self
                .spec
                .secrets
                .iter()
                .filter(|f| f.extension().is_some_and(|e| e == "age"))
                .count();
            return Ok((
                Status::Unchanged,
                format!("its key already reads its {ages} age secret(s)"),
            ));
        }
        Ok((Status::Changed, done.join("; ")))
    }

    fn sops(&mut self) -> StepResult {
        let mut files: Vec<PathBuf> = sops_files(self.spec);
        // Files an old key was taken out of, that the VM no longer lists.
        for file in std::mem::take(&mut self.extra_sops) {
            if !files.contains(&file) {
                files.push(file);
            }
        }
        if files.is_empty() {
            return Ok((Status::Skipped, "no sops secrets".to_string()));
        }
        let fleet = self.app.fleet()?;
        match sops_updatekeys(fleet_dir(&fleet.file), &files)? {
            Err(program) => Ok((
                Status::Left,
                format!(
                    "`{program}` is not installed, so nothing re-encrypts them with the rule's keys: run sops updatekeys -y {}",
                    paths(&files)
                ),
            )),
            Ok(changed) if changed.is_empty() => {
                Ok((Status::Unchanged, format!("{} up to date", paths(&files))))
            }
            Ok(changed) => Ok((Status::Changed, format!("re-encrypted {}", paths(&changed)))),
        }
    }

    fn nixos(&mut self) -> StepResult {
        let name = self.name().to_string();
        let Some(attr) = self.spec.nixos.as_deref() else {
            return Ok((Status::Skipped, format!("vms.{name} has no `nixos`")));
        };
        let fleet = self.app.fleet()?;
        let endpoint = guest::endpoint(self.app, &name)?;
        let mut done = Vec::new();
        if let Some(folder) = nixos::host_folder(&fleet.file, attr) {
            let file = folder.join(nixos::HARDWARE_CONFIG);
            if !file.exists() {
                let config = ssh_output(&endpoint, &nixos::hardware_config_argv())?;
                crate::fsutil::write_atomic(&file, &config, 0o644)?;
                done.push(format!("generated {}", file.display()));
            }
            // A flake in git sees only files git knows (also when an earlier
            // run wrote the file and its `git add` failed).
            if let Some(staged) = git_add(&file)? {
                done.push(staged);
            }
        }
        let flake = crate::provision::flake_ref(&fleet.file, attr);
        let want = nixos::toplevel(&flake)?;
        let current = |endpoint: &crate::ssh::Endpoint| -> Result<String> {
            let argv = ["readlink".into(), "-f".into(), nixos::CURRENT_SYSTEM.into()];
            let out = ssh_run(endpoint, &argv)?;
            // A guest that never ran NixOS has no current system: readlink fails.
            Ok(if out.status.success() {
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            } else {
                String::new()
            })
        };
        if current(&endpoint)? == want {
            if done.is_empty() {
                return Ok((Status::Unchanged, format!("already runs {want}")));
            }
            done.push(format!("already runs {want}"));
            return Ok((Status::Changed, done.join("; ")));
        }
        if let Outcome::SystemChanged { boot: Some(boot) } =
            self.app.call_one(&name, Op::SystemChanged)?
        {
            done.push(format!(
                "boots through its {boot}'s bootloader from its next start on"
            ));
        }
        let mut cmd = crate::provision::command(&fleet.file, &name, Some(attr), &endpoint)?;
        // nixos-rebuild's output is the user's; stdout stays free for --json.
        cmd.stdout(std::process::Stdio::from(std::io::stderr()));
        let status = cmd.status().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!(
                "{} is not installed (it comes with Nix/NixOS)",
                cmd.get_program().to_string_lossy()
            ),
            _ => anyhow::Error::new(e).context("running nixos-rebuild"),
        })?;
        if !status.success() {
            bail!(
                "{} exited with {status}",
                crate::provision::shell_line(&cmd)
            );
        }
        let now = current(&endpoint)?;
        if now != want {
            bail!(
                "nixos-rebuild finished, but {} on the guest is {now:?}, not {want}",
                nixos::CURRENT_SYSTEM
            );
        }
        done.push(format!("switched to {want}"));
        Ok((Status::Changed, done.join("; ")))
    }

    fn tailscale(&mut self) -> StepResult {
        let name = self.name().to_string();
        let Some(tailscale) = &self.spec.tailscale else {
            return Ok((Status::Skipped, format!("vms.{name} has no `tailscale`")));
        };
        let status = guest::run_captured(
            self.app,
            &name,
            vec!["tailscale".into(), "status".into(), "--json".into()],
            60,
        )
        .context("running tailscale in the guest (is agentvm.tailscale.enable set?)")?;
        if nixos::tailscale_running(&status.stdout) {
            return Ok((Status::Unchanged, "already in its tailnet".to_string()));
        }
        // Only now: a one-off key may be gone once the VM is enrolled.
        let key = nixos::read_auth_key(&tailscale.auth_key_file, &name)?;
        let up = guest::run_captured_with(
            self.app,
            &name,
            nixos::tailscale_up_argv(&name),
            Some(key.to_vec()),
            300,
        )?;
        if !up.success() {
            bail!("tailscale up: {}", up.tail());
        }
        Ok((Status::Changed, format!("enrolled as {name}")))
    }

    fn inventory(&mut self) -> StepResult {
        let fleet = self.app.fleet()?;
        let row = inventory::Row {
            name: self.name().to_string(),
            backend: self.backend.clone(),
            image: self.spec.image.as_ref().map(ToString::to_string),
            cpus: Some(self.spec.cpus),
            memory: Some(self.spec.memory.to_string()),
            disk: self.spec.disk.map(|d| d.to_string()),
            ssh_port: self.ports.0,
            spice_port: self.ports.1,
            host_key: self.host_key.as_deref().map(fingerprint).transpose()?,
            purpose: self.spec.purpose.clone(),
        };
        let file = inventory::path(&fleet.file);
        if inventory::update(&file, self.name(), Some(&row))? {
            Ok((
                Status::Changed,
                format!("wrote its row in {}", file.display()),
            ))
        } else {
            Ok((Status::Unchanged, format!("{} lists it", file.display())))
        }
    }
}

/// `--dry-run`: what each step would do, changing nothing and asking no VM.
fn plan(
    app: &App,
    spec: &VmSpec,
    identity: &Path,
    timeout: u64,
    resumed_at: Option<Step>,
) -> VmDeploy {
    let name = spec.name.as_str();
    let mut report = VmDeploy::new(name, resumed_at);
    let fleet_file = app
        .fleet
        .as_ref()
        .map(|f| f.file.clone())
        .unwrap_or_default();
    let sops = sops_files(spec);
    for step in Step::ALL {
        let (status, detail) = match step {
            Step::Up => (
                Status::Planned,
                format!("start {name} unless it runs, and wait up to {timeout} s for SSH"),
            ),
            Step::HostKey => (
                Status::Planned,
                "read its SSH host key through the guest agent and pin it".to_string(),
            ),
            Step::Secrets if spec.secrets.is_empty() => {
                (Status::Skipped, format!("vms.{name} has no secrets"))
            }
            Step::Secrets => (
                Status::Planned,
                format!(
                    "add its host key as a recipient of {} (secrets.nix{}) and re-encrypt the age files with {}",
                    paths(&spec.secrets),
                    if sops.is_empty() { "" } else { ", .sops.yaml" },
                    identity.display()
                ),
            ),
            Step::Sops if sops.is_empty() => (Status::Skipped, "no sops secrets".to_string()),
            Step::Sops => (
                Status::Planned,
                format!("sops updatekeys -y {}", paths(&sops)),
            ),
            Step::Nixos => match spec.nixos.as_deref() {
                None => (Status::Skipped, format!("vms.{name} has no `nixos`")),
                Some(attr) => {
                    let mut what = Vec::new();
                    if let Some(folder) = nixos::host_folder(&fleet_file, attr)
                        && !folder.join(nixos::HARDWARE_CONFIG).exists()
                    {
                        what.push(format!(
                            "generate {} over SSH (nixos-generate-config --show-hardware-config --no-filesystems)",
                            folder.join(nixos::HARDWARE_CONFIG).display()
                        ));
                    }
                    what.push(format!(
                        "nixos-rebuild switch --flake {} --target-host (unless the guest already runs that system)",
                        crate::provision::flake_ref(&fleet_file, attr)
                    ));
                    (Status::Planned, what.join("; then "))
                }
            },
            Step::Tailscale => match &spec.tailscale {
                None => (Status::Skipped, format!("vms.{name} has no `tailscale`")),
                Some(t) => (
                    Status::Planned,
                    format!(
                        "unless it is in its tailnet: tailscale up with the key in {}, handed to it on its standard input through the guest agent",
                        t.auth_key_file.display()
                    ),
                ),
            },
            Step::Inventory => (
                Status::Planned,
                format!("set its row in {}", inventory::path(&fleet_file).display()),
            ),
        };
        let line = StepReport::new(step, status, detail);
        if !app.json {
            outln!("{}", step_line(name, &line));
        }
        report.push(line);
    }
    report
}
