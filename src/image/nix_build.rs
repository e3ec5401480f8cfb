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

/// What a build produced, and from which inputs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildRecord {
    /// The key of the inputs it was built from ([`super::flake_inputs::inputs_key`]).
    pub inputs: String,
    /// The qcow2 `nix build` produced (a Nix store path).
    pub output: PathBuf,
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
/// progress steps of `image`, and returns the qcow2 it built.
pub fn build(image: &str, flake_ref: &str, progress: &dyn Reporter) -> Result<PathBuf> {
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
    find_qcow2(Path::new(out))
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
}
