//! The host-side pieces of a deploy that need no daemon: `sops updatekeys`,
//! `git add` of a generated file, commands over a VM's SSH endpoint, and how
//! files and keys are named in the steps' reports.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::paths::{ENV_SOPS, non_empty_env};
use crate::spec::VmSpec;

/// A VM's secrets that are sops files (everything but `.age`).
pub fn sops_files(spec: &VmSpec) -> Vec<PathBuf> {
    spec.secrets
        .iter()
        .filter(|f| f.extension().is_none_or(|e| e != "age"))
        .cloned()
        .collect()
}

/// Files as a report names them: `a, b`.
pub fn paths(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `sops updatekeys -y` of each file (run in the fleet's folder, given an
/// absolute path): the files it changed, or `Err(program)` when sops is not
/// installed.
pub fn sops_updatekeys(
    fleet_dir: &Path,
    files: &[PathBuf],
) -> Result<std::result::Result<Vec<PathBuf>, String>> {
    let program = non_empty_env(ENV_SOPS).unwrap_or_else(|| "sops".to_string());
    let mut changed = Vec::new();
    for file in files {
        let path = std::path::absolute(file)
            .with_context(|| format!("the absolute path of {}", file.display()))?;
        let before = std::fs::read(&path).with_context(|| format!("reading {}", file.display()))?;
        let out = match Command::new(&program)
            .args(["updatekeys", "-y"])
            .arg(&path)
            .current_dir(fleet_dir)
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err(program)),
            Err(e) => return Err(e).context("running sops"),
        };
        if !out.status.success() {
            bail!(
                "sops updatekeys {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if std::fs::read(&path).ok().as_ref() != Some(&before) {
            changed.push(file.clone());
        }
    }
    Ok(Ok(changed))
}

/// The files a rekey left as they were, with why.
pub fn failures(report: &crate::secrets::Report) -> String {
    report
        .failed
        .iter()
        .map(|(file, why)| format!("{}: {why}", file.display()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `SHA256:…` of a `type base64` public key.
pub fn fingerprint(public: &str) -> Result<String> {
    let key = ssh_key::PublicKey::from_openssh(public.trim())
        .with_context(|| format!("not an SSH public key: {public:?}"))?;
    Ok(key.fingerprint(ssh_key::HashAlg::Sha256).to_string())
}

/// `git add FILE` when its folder is in a git work tree (a flake there sees
/// only files git knows); what it did, for the step's report.
pub fn git_add(file: &Path) -> Result<Option<String>> {
    let dir = file.parent().context("the file's folder")?;
    let inside = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--is-inside-work-tree"])
        .output();
    match inside {
        Ok(out) if out.status.success() => {}
        // Not a git checkout (or no git): nothing to stage.
        _ => return Ok(None),
    }
    let known = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["ls-files", "--error-unmatch", "--"])
        .arg(file)
        .output()
        .context("running git ls-files")?;
    if known.status.success() {
        return Ok(None);
    }
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .arg("add")
        .arg("--")
        .arg(file)
        .output()
        .context("running git add")?;
    if !out.status.success() {
        bail!(
            "git add {}: {} (the flake cannot see it until git does)",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Some(format!(
        "staged {} with git add (commit it with the host)",
        file.display()
    )))
}

/// Runs `argv` on the guest over SSH; an SSH that cannot connect (exit 255)
/// is an error naming the address tried.
pub fn ssh_run(endpoint: &crate::ssh::Endpoint, argv: &[String]) -> Result<std::process::Output> {
    let out = endpoint
        .command(argv)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running ssh (is openssh-client installed?)")?;
    if out.status.code() == Some(255) {
        bail!(
            "cannot reach {} over SSH at {}@{}:{}: {}",
            endpoint.vm,
            endpoint.user,
            endpoint.host,
            endpoint.port,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `argv` on the guest over SSH and returns its stdout; a failure names
/// the address tried.
pub fn ssh_output(endpoint: &crate::ssh::Endpoint, argv: &[String]) -> Result<Vec<u8>> {
    let out = ssh_run(endpoint, argv)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`{}` over SSH to {}@{}:{} failed ({}): {}",
            argv.join(" "),
            endpoint.user,
            endpoint.host,
            endpoint.port,
            out.status,
            stderr.trim()
        );
    }
    Ok(out.stdout)
}
