//! Building NixOS images from flakes: `nix build`, with a record of what was
//! built from which inputs (see [`super::flake_inputs`]) so an unchanged flake
//! is not built again.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::fsutil::{read_json_state, write_atomic};
use crate::paths::{ENV_NIX, non_empty_env};
use crate::progress::Reporter;

/// The `nix` program, unless `AGENTVM_NIX` names another.
pub const NIX: &str = "nix";

/// The file a NixOS image output may hold beside its qcow2, naming the
/// system's kernel, initrd and kernel command line (`init=…` of the system
/// the disk holds): with it, agentvm boots the VM directly, without the
/// bootloader (see `hosts/agent-base`).
pub const BOOT_FILE: &str = "agentvm-boot.json";

/// What a build produced, and from which inputs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildRecord {
    /// The key of the inputs it was built from ([`super::flake_inputs::inputs_key`]).
    pub inputs: String,
    /// The qcow2 `nix build` produced (a Nix store path).
    pub output: PathBuf,
    /// The kernel, initrd and command line of the system on the disk, when
    /// the output says them ([`BOOT_FILE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootFiles>,
}

/// A NixOS image's own kernel, initrd and kernel command line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

/// What one `nix build` produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutput {
    pub disk: PathBuf,
    pub boot: Option<BootFiles>,
}

/// The build records in `path` (none when the file does not exist); a file that
/// cannot be parsed is an error, and is not written over.
pub fn read_records(path: &Path) -> Result<BTreeMap<String, BuildRecord>> {
    read_json_state(path)
}

pub fn write_records(path: &Path, records: &BTreeMap<String, BuildRecord>) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(records)?, 0o600)
}

/// Runs `nix build --no-link --print-out-paths FLAKE_REF`, passing its log on as
/// progress steps of `image`, and returns the qcow2 it built (and its boot
/// files, when the output has them).
pub fn build(image: &str, flake_ref: &str, progress: &dyn Reporter) -> Result<BuildOutput> {
    let nix = non_empty_env(ENV_NIX).unwrap_or_else(|| NIX.to_string());
    let mut child = Command::new(&nix)
        .args([
            "--extra-experimental-features",
            "nix-command flakes",
            "build",
            "--no-link",
            "--print-out-paths",
            flake_ref,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!(
                "image {image} is built from the flake {flake_ref}, but `{nix}` is not installed (or not on PATH)"
            ),
            _ => anyhow::Error::new(e).context("running nix build"),
        })?;
    let stderr = child.stderr.take().context("nix stderr")?;
    let mut tail = Vec::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        progress.step(image, &format!("nix: {line}"));
        tail.push(line);
        if tail.len() > 20 {
            tail.remove(0);
        }
    }
    let output = child.wait_with_output().context("waiting for nix build")?;
    if !output.status.success() {
        bail!(
            "nix build {flake_ref} failed ({}):\n{}",
            output.status,
            tail.join("\n")
        );
    }
    let out_paths = String::from_utf8_lossy(&output.stdout);
    let out = out_paths
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .with_context(|| format!("nix build {flake_ref} printed no output path"))?;
    let out = Path::new(out);
    Ok(BuildOutput {
        disk: find_qcow2(out)?,
        boot: boot_files(out)?,
    })
}

/// The boot files a build output names in [`BOOT_FILE`], if it has one; a
/// file that does not parse, or names files that do not exist, is an error
/// naming it (a silent bootloader boot would hide a broken image build).
pub fn boot_files(out: &Path) -> Result<Option<BootFiles>> {
    if !out.is_dir() {
        return Ok(None);
    }
    let path = out.join(BOOT_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let boot: BootFiles = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not {{\"kernel\": PATH, \"initrd\": PATH, \"cmdline\": TEXT}}",
            path.display()
        )
    })?;
    for file in [&boot.kernel, &boot.initrd] {
        if !file.is_file() {
            bail!(
                "{} names {}, which does not exist",
                path.display(),
                file.display()
            );
        }
    }
    Ok(Some(boot))
}

/// The qcow2 in a build output: the output itself, or the one file ending in .qcow2 inside it.
fn find_qcow2(out: &Path) -> Result<PathBuf> {
    if out.is_file() {
        return Ok(out.to_path_buf());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(out)
        .with_context(|| format!("reading build output {}", out.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!("build output {} has no .qcow2 file", out.display()),
        _ => bail!("build output {} has several .qcow2 files", out.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_records_round_trip_and_a_corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("builds.json");
        assert!(
            read_records(&path).unwrap().is_empty(),
            "no file, no records"
        );
        let records = BTreeMap::from([(
            "base".to_string(),
            BuildRecord {
                inputs: "sha256:00".into(),
                output: "/nix/store/x-image/nixos.qcow2".into(),
                boot: None,
            },
        )]);
        write_records(&path, &records).unwrap();
        assert_eq!(read_records(&path).unwrap(), records);
        std::fs::write(&path, "{\"base\": {\"inputs\": 7}}").unwrap();
        let err = format!("{:#}", read_records(&path).unwrap_err());
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("line 1 column"), "{err}");
    }

    #[test]
    fn finds_the_qcow2_in_an_output_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nixos.qcow2"), b"x").unwrap();
        std::fs::write(dir.path().join("nix-support"), b"x").unwrap();
        assert_eq!(
            find_qcow2(dir.path()).unwrap(),
            dir.path().join("nixos.qcow2")
        );
        std::fs::write(dir.path().join("other.qcow2"), b"x").unwrap();
        assert!(find_qcow2(dir.path()).is_err());
    }

    #[test]
    fn boot_files_are_read_and_a_bad_boot_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(boot_files(dir.path()).unwrap(), None, "none written");
        let (kernel, initrd) = (dir.path().join("kernel"), dir.path().join("initrd"));
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        let file = dir.path().join(BOOT_FILE);
        let write = |json: serde_json::Value| std::fs::write(&file, json.to_string()).unwrap();
        write(serde_json::json!({"kernel": kernel, "initrd": initrd, "cmdline": "init=/x"}));
        assert_eq!(
            boot_files(dir.path()).unwrap(),
            Some(BootFiles {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: "init=/x".into()
            })
        );
        write(serde_json::json!({"kernel": kernel, "cmdline": "init=/x"}));
        let err = format!("{:#}", boot_files(dir.path()).unwrap_err());
        assert!(err.contains(BOOT_FILE) && err.contains("initrd"), "{err}");
        write(serde_json::json!({"kernel": "/nonexistent/k", "initrd": initrd, "cmdline": ""}));
        let err = format!("{:#}", boot_files(dir.path()).unwrap_err());
        assert!(
            err.contains("/nonexistent/k") && err.contains("does not exist"),
            "{err}"
        );
    }
}
