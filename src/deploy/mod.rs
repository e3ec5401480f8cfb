//! `agentvm deploy` and `agentvm retire`: the steps of the new-agent flow,
//! how far a deploy got (so the next one resumes there), and what each step
//! reports. The steps themselves talk to the daemon and run in `cli/deploy.rs`.

pub mod inventory;
pub mod nixos;
pub mod tools;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::fsutil::{read_json_state, write_atomic};

/// The steps of a deploy, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Start the VM (or find it running) and wait for SSH.
    Up,
    /// Read the guest's SSH host key through its agent and pin it.
    HostKey,
    /// Add the host key to `secrets.nix`/`.sops.yaml` and re-encrypt its age files.
    Secrets,
    /// `sops updatekeys` of its sops files.
    Sops,
    /// `nixos-rebuild switch` of its host (hardware config generated first).
    Nixos,
    /// `tailscale up` with its auth key.
    Tailscale,
    /// Its row in `docs/machines.md`.
    Inventory,
}

impl Step {
    pub const ALL: [Step; 7] = [
        Step::Up,
        Step::HostKey,
        Step::Secrets,
        Step::Sops,
        Step::Nixos,
        Step::Tailscale,
        Step::Inventory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Up => "up",
            Step::HostKey => "host-key",
            Step::Secrets => "secrets",
            Step::Sops => "sops",
            Step::Nixos => "nixos",
            Step::Tailscale => "tailscale",
            Step::Inventory => "inventory",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// It changed something.
    Changed,
    /// Everything was already as it should be.
    Unchanged,
    /// It does not apply to this VM (no secrets, no `nixos`, …).
    Skipped,
    /// It could not do all of its work and says what is left (not an error).
    Left,
    /// It failed: the deploy stopped here.
    Failed,
    /// `--dry-run`: it would run.
    Planned,
}

impl Status {
    pub fn text(self) -> &'static str {
        match self {
            Status::Changed => "changed",
            Status::Unchanged => "unchanged",
            Status::Skipped => "skipped",
            Status::Left => "left to do",
            Status::Failed => "FAILED",
            Status::Planned => "planned",
        }
    }
}

/// One step's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    pub step: Step,
    pub status: Status,
    /// What it did or found, or why it failed.
    pub detail: String,
    /// How long it took.
    pub ms: u64,
}

impl StepReport {
    pub fn new(step: Step, status: Status, detail: impl Into<String>) -> Self {
        Self {
            step,
            status,
            detail: detail.into(),
            ms: 0,
        }
    }
}

/// The failed step a deploy stopped at.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub step: Step,
    pub error: String,
    /// Unix time in seconds.
    pub at: u64,
}

/// `$AGENTVM_HOME/deploys/NAME.json`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct DeployState {
    /// Where the last deploy stopped; `None` once one went through.
    #[serde(default)]
    pub failed: Option<Failure>,
    /// The host key the last deploy pinned (`type base64`).
    #[serde(default)]
    pub host_key: Option<String>,
    /// Unix time in seconds of the last deploy that went through.
    #[serde(default)]
    pub deployed_at: Option<u64>,
}

impl DeployState {
    /// The state in `path` (empty when there is none); a file that cannot be
    /// parsed is an error naming it, and is left as it is.
    pub fn read(path: &Path) -> Result<Self> {
        read_json_state(path)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let dir = path.parent().context("deploy state folder")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let bytes = serde_json::to_vec_pretty(self)?;
        if std::fs::read(path).is_ok_and(|old| old == bytes) {
            return Ok(());
        }
        write_atomic(path, &bytes, 0o600)
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// A deploy's report on one VM, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct VmDeploy {
    pub name: String,
    pub steps: Vec<StepReport>,
    /// Some step changed something.
    pub changed: bool,
    /// The step it stopped at.
    pub failed: Option<Step>,
    /// The step this run resumed at (the one the last run failed at).
    pub resumed_at: Option<Step>,
}

impl VmDeploy {
    pub fn new(name: &str, resumed_at: Option<Step>) -> Self {
        Self {
            name: name.to_string(),
            steps: Vec::new(),
            changed: false,
            failed: None,
            resumed_at,
        }
    }

    pub fn push(&mut self, report: StepReport) {
        if report.status == Status::Changed {
            self.changed = true;
        }
        if report.status == Status::Failed {
            self.failed = Some(report.step);
        }
        self.steps.push(report);
    }
}

/// A step's line: `drago: [3/7] secrets: changed (0.4 s): …`.
pub fn step_line(vm: &str, report: &StepReport) -> String {
    let n = Step::ALL
        .iter()
        .position(|s| *s == report.step)
        .map_or(0, |i| i + 1);
    let time = if report.status == Status::Planned || report.status == Status::Skipped {
        String::new()
    } else {
        format!(" ({:.1} s)", report.ms as f64 / 1000.0)
    };
    format!(
        "{vm}: [{n}/{}] {}: {}{time}: {}",
        Step::ALL.len(),
        report.step,
        report.status.text(),
        report.detail
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_corrupt_one_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("deploys/drago.json");
        assert!(DeployState::read(&path).unwrap().failed.is_none());
        let state = DeployState {
            failed: Some(Failure {
                step: Step::Secrets,
                error: "no identity".into(),
                at: 1,
            }),
            host_key: Some("ssh-ed25519 AAAA".into()),
            deployed_at: None,
        };
        state.write(&path).unwrap();
        let read = DeployState::read(&path).unwrap();
        assert_eq!(read.failed.unwrap().step, Step::Secrets);
        assert_eq!(read.host_key, state.host_key);

        std::fs::write(&path, b"{\"failed\": ").unwrap();
        let err = DeployState::read(&path).unwrap_err();
        assert!(format!("{err:#}").contains("drago.json"), "{err:#}");
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"failed\": ");
    }

    #[test]
    fn step_lines_number_the_steps() {
        let mut report = StepReport::new(Step::Secrets, Status::Changed, "re-encrypted a.age");
        report.ms = 1234;
        assert_eq!(
            step_line("drago", &report),
            "drago: [3/7] secrets: changed (1.2 s): re-encrypted a.age"
        );
        let skipped = StepReport::new(Step::Nixos, Status::Skipped, "no `nixos`");
        assert_eq!(
            step_line("drago", &skipped),
            "drago: [5/7] nixos: skipped: no `nixos`"
        );
    }
}
