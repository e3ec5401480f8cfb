//! The few `qemu-img` operations the store needs. qemu-img is the reference
//! implementation of the qcow2 format, so it is run rather than re-implemented.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

pub const QEMU_IMG: &str = "qemu-img";

/// Disk formats agentvm imports and backs overlays with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

#[derive(Debug, Clone)]
pub struct DiskInfo {
    pub format: DiskFormat,
    pub virtual_size: u64,
}

#[derive(Deserialize)]
struct RawInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
}

fn raw_info(path: &Path) -> Result<RawInfo> {
    let output = run(Command::new(QEMU_IMG)
        .args(["info", "--output=json", "-U"])
        .arg(path))?;
    serde_json::from_slice(&output)
        .with_context(|| format!("reading qemu-img info for {}", path.display()))
}

/// The virtual size of any image qemu-img can read (an overlay included).
pub fn virtual_size(path: &Path) -> Result<u64> {
    Ok(raw_info(path)?.virtual_size)
}

/// Format and virtual size of a disk image; refuses formats and layouts agentvm cannot base a VM on.
pub fn info(path: &Path) -> Result<DiskInfo> {
    let raw = raw_info(path)?;
    if let Some(backing) = raw.backing_filename {
        bail!(
            "{} has a backing file ({backing}); flatten it first: qemu-img convert -O qcow2 {} flat.qcow2",
            path.display(),
            path.display()
        );
    }
    let format = match raw.format.as_str() {
        "qcow2" => DiskFormat::Qcow2,
        "raw" => DiskFormat::Raw,
        other => bail!(
            "{} is a {other} image; agentvm takes qcow2 or raw (convert with: qemu-img convert -O qcow2 {} out.qcow2)",
            path.display(),
            path.display()
        ),
    };
    Ok(DiskInfo {
        format,
        virtual_size: raw.virtual_size,
    })
}

/// A thin qcow2 overlay on `base`, `size` bytes large (the base's size when `None`).
pub fn create_overlay(
    base: &Path,
    base_format: DiskFormat,
    overlay: &Path,
    size: Option<u64>,
) -> Result<()> {
    let mut cmd = Command::new(QEMU_IMG);
    cmd.args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        base_format.as_str(),
        "-b",
    ])
    .arg(base)
    .arg(overlay);
    if let Some(size) = size {
        cmd.arg(size.to_string());
    }
    run(&mut cmd).map(drop)
}

/// The backing file `path`'s header names, if any.
pub fn backing_file(path: &Path) -> Result<Option<std::path::PathBuf>> {
    Ok(raw_info(path)?.backing_filename.map(Into::into))
}

/// Rebases the qcow2 `image` onto `base` (of `base_format`), copying into
/// it what its old backing chain holds and `base` does not: afterwards it
/// needs only `base`.
pub fn rebase(image: &Path, base: &Path, base_format: DiskFormat) -> Result<()> {
    run(Command::new(QEMU_IMG)
        .args([
            "rebase",
            "-q",
            "-f",
            "qcow2",
            "-F",
            base_format.as_str(),
            "-b",
        ])
        .arg(base)
        .arg(image))
    .map(drop)
}

/// An empty qcow2 disk.
pub fn create_blank(path: &Path, size: u64) -> Result<()> {
    run(Command::new(QEMU_IMG)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string()))
    .map(drop)
}

/// Grows a qcow2 image to `size` bytes.
pub fn grow(path: &Path, size: u64) -> Result<()> {
    run(Command::new(QEMU_IMG)
        .args(["resize", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string()))
    .map(drop)
}

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let shown = format!("{cmd:?}");
    let output = cmd
        .output()
        .with_context(|| format!("running {QEMU_IMG} (is qemu-utils installed?): {shown}"))?;
    if !output.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}
