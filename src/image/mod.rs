//! The content-addressed image store under `$AGENTVM_HOME/images`.
//!
//! A source file is copied in once, named by its sha256; an index keyed by the
//! source's path, size and mtime makes re-importing an unchanged file instant.

pub mod flake_inputs;
pub mod nix_build;
pub mod qemu_img;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::KernelBoot;
use crate::fsutil::{FileLock, create_private_dir, read_json_state, write_atomic};
use crate::paths::Home;
use crate::paths::{BUILDS_FILE, STORE_LOCK_FILE};
use crate::progress::Reporter;
use crate::spec::{ImageSource, ImageSpec};
pub use qemu_img::{DiskFormat, DiskInfo};

const COPY_CHUNK: usize = 1 << 20;

/// A file in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// `sha256:<hex>` of the content.
    pub digest: String,
    pub path: PathBuf,
}

/// A base disk in the store.
#[derive(Debug, Clone)]
pub struct BaseDisk {
    pub file: StoredFile,
    pub format: DiskFormat,
    pub virtual_size: u64,
}

/// An image ready to boot VMs from.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// One digest for everything the image is made of.
    pub digest: String,
    pub base: Option<BaseDisk>,
    pub kernel: Option<KernelBoot>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct IndexEntry {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    digest: String,
    file_name: String,
}

pub struct ImageStore {
    dir: PathBuf,
    index_path: PathBuf,
}

impl ImageStore {
    pub fn new(home: &Home) -> Self {
        Self {
            dir: home.images_dir(),
            index_path: home.image_index(),
        }
    }

    /// Imports whatever the image is made of and returns it ready to use.
    /// Imports are serialized by a lock on the store, so many VMs asking for the
    /// same image at once import it once: the others then find it in the index.
    pub fn prepare(&self, image: &ImageSpec, progress: &dyn Reporter) -> Result<PreparedImage> {
        create_private_dir(&self.dir)?;
        let _guard = FileLock::acquire(&self.dir.join(STORE_LOCK_FILE))?;
        match &image.source {
            ImageSource::File(path) => {
                let base = self.import_disk(path, progress)?;
                Ok(PreparedImage {
                    digest: base.file.digest.clone(),
                    base: Some(base),
                    kernel: None,
                })
            }
            ImageSource::Flake(flake_ref) => {
                let (base, boot, _) =
                    self.build_flake_locked(image.name.as_str(), flake_ref, false, progress)?;
                let Some(boot) = boot else {
                    return Ok(PreparedImage {
                        digest: base.file.digest.clone(),
                        base: Some(base),
                        kernel: None,
                    });
                };
                // The system's own kernel and initrd, booted directly; the
                // disk keeps its bootloader for after the system changes.
                let kernel = self.import_blob(&boot.kernel, "kernel", progress)?;
                let initrd = self.import_blob(&boot.initrd, "initrd", progress)?;
                let mut hasher = Sha256::new();
                for part in [&kernel.digest, &initrd.digest, &base.file.digest] {
                    hasher.update(part.as_bytes());
                    hasher.update(b"\n");
                }
                hasher.update(boot.cmdline.as_bytes());
                Ok(PreparedImage {
                    digest: format!("sha256:{}", hex::encode(hasher.finalize())),
                    base: Some(base),
                    kernel: Some(KernelBoot {
                        kernel: kernel.path,
                        initrd: Some(initrd.path),
                        cmdline: Some(boot.cmdline),
                        disk_boots: true,
                    }),
                })
            }
            ImageSource::Kernel {
                kernel,
                initrd,
                cmdline,
                disk,
            } => {
                let kernel_file = self.import_blob(kernel, "kernel", progress)?;
                let initrd_file = initrd
                    .as_deref()
                    .map(|p| self.import_blob(p, "initrd", progress))
                    .transpose()?;
                let base = disk
                    .as_deref()
                    .map(|p| self.import_disk(p, progress))
                    .transpose()?;
                let mut hasher = Sha256::new();
                for part in [
                    Some(&kernel_file.digest),
                    initrd_file.as_ref().map(|f| &f.digest),
                    base.as_ref().map(|b| &b.file.digest),
                ] {
                    hasher.update(part.map_or("-", String::as_str).as_bytes());
                    hasher.update(b"\n");
                }
                Ok(PreparedImage {
                    digest: format!("sha256:{}", hex::encode(hasher.finalize())),
                    base,
                    kernel: Some(KernelBoot {
                        kernel: kernel_file.path,
                        initrd: initrd_file.map(|f| f.path),
                        cmdline: cmdline.clone(),
                        disk_boots: false,
                    }),
                })
            }
        }
    }

    /// Builds a flake image (unless its inputs, as [`flake_inputs::inputs_key`]
    /// sees them, are what the last build used, or `rebuild`) and imports the
    /// qcow2 by content.
    /// Returns the base and whether `nix build` ran.
    pub fn build_flake(
        &self,
        image: &str,
        flake_ref: &str,
        rebuild: bool,
        progress: &dyn Reporter,
    ) -> Result<(BaseDisk, bool)> {
        create_private_dir(&self.dir)?;
        let _guard = FileLock::acquire(&self.dir.join(STORE_LOCK_FILE))?;
        let (base, _, built) = self.build_flake_locked(image, flake_ref, rebuild, progress)?;
        Ok((base, built))
    }

    /// [`ImageStore::build_flake`] under the store lock; also returns the
    /// image's boot files, when its build output names them.
    fn build_flake_locked(
        &self,
        image: &str,
        flake_ref: &str,
        rebuild: bool,
        progress: &dyn Reporter,
    ) -> Result<(BaseDisk, Option<nix_build::BootFiles>, bool)> {
        let records_path = self.dir.join(BUILDS_FILE);
        let mut records = nix_build::read_records(&records_path)?;
        let inputs = flake_inputs::inputs_key(flake_ref);
        if !rebuild
            && let (Ok(inputs), Some(record)) = (&inputs, records.get(image))
            && &record.inputs == inputs
            && record.output.is_file()
            && record
                .boot
                .as_ref()
                .is_none_or(|b| b.kernel.is_file() && b.initrd.is_file())
        {
            progress.step(image, "flake inputs unchanged: not building again");
            let base = self.import_disk(&record.output, progress)?;
            return Ok((base, record.boot.clone(), false));
        }
        if let Err(why) = &inputs {
            progress.step(image, &format!("{why}: building"));
        }
        let output = nix_build::build(image, flake_ref, progress)?;
        let base = self.import_disk(&output.disk, progress)?;
        if let Ok(inputs) = inputs {
            records.insert(
                image.to_string(),
                nix_build::BuildRecord {
                    inputs,
                    output: output.disk,
                    boot: output.boot.clone(),
                },
            );
            nix_build::write_records(&records_path, &records)?;
        }
        Ok((base, output.boot, true))
    }

    /// Imports a qcow2 or raw disk image.
    pub fn import_disk(&self, source: &Path, progress: &dyn Reporter) -> Result<BaseDisk> {
        let info = qemu_img::info(source)?;
        let file = self.import(source, info.format.as_str(), progress)?;
        Ok(BaseDisk {
            file,
            format: info.format,
            virtual_size: info.virtual_size,
        })
    }

    /// Imports any file (a kernel, an initrd) by content.
    pub fn import_blob(
        &self,
        source: &Path,
        kind: &str,
        progress: &dyn Reporter,
    ) -> Result<StoredFile> {
        self.import(source, kind, progress)
    }

    fn import(
        &self,
        source: &Path,
        extension: &str,
        progress: &dyn Reporter,
    ) -> Result<StoredFile> {
        let source = source
            .canonicalize()
            .with_context(|| format!("image file {}", source.display()))?;
        let meta =
            fs::metadata(&source).with_context(|| format!("reading {}", source.display()))?;
        if !meta.is_file() {
            bail!("image file {} is not a regular file", source.display());
        }
        create_private_dir(&self.dir)?;
        let mut index = self.read_index()?;
        let key = source.to_string_lossy().into_owned();
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        if let Some(entry) = index.get(&key)
            && entry.size == meta.len()
            && entry.mtime_ns == mtime_ns
            && entry.inode == meta.ino()
        {
            let path = self.dir.join(&entry.file_name);
            if path.is_file() {
                return Ok(StoredFile {
                    digest: entry.digest.clone(),
                    path,
                });
            }
        }

        let (digest, tmp) = self.copy_hashing(&source, meta.len(), progress)?;
        let hex = digest.trim_start_matches("sha256:");
        let file_name = format!("{hex}.{extension}");
        let path = self.dir.join(&file_name);
        if path.is_file() {
            drop(tmp);
        } else {
            let tmp_path = tmp.into_temp_path();
            fs::set_permissions(&tmp_path, fs::Permissions::from_mode(0o444))?;
            tmp_path
                .persist(&path)
                .with_context(|| format!("storing {}", path.display()))?;
            crate::fsutil::sync_dir(&self.dir);
        }
        index.insert(
            key,
            IndexEntry {
                size: meta.len(),
                mtime_ns,
                inode: meta.ino(),
                digest: digest.clone(),
                file_name,
            },
        );
        self.write_index(&index)?;
        Ok(StoredFile { digest, path })
    }

    /// Copies `source` into a temp file in the store while hashing it; runs of
    /// zeros become holes so sparse images stay sparse.
    fn copy_hashing(
        &self,
        source: &Path,
        total: u64,
        progress: &dyn Reporter,
    ) -> Result<(String, tempfile::NamedTempFile)> {
        let mut input =
            File::open(source).with_context(|| format!("opening {}", source.display()))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".import-")
            .tempfile_in(&self.dir)
            .with_context(|| format!("creating a temp file in {}", self.dir.display()))?;
        let label = format!(
            "importing {}",
            source.file_name().unwrap_or_default().to_string_lossy()
        );
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut done = 0u64;
        loop {
            let n = read_full(&mut input, &mut buf)?;
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            hasher.update(chunk);
            let out = tmp.as_file_mut();
            if chunk.iter().all(|&b| b == 0) {
                out.seek(SeekFrom::Current(n as i64))?;
            } else {
                out.write_all(chunk)?;
            }
            done += n as u64;
            progress.bytes(&label, done, total);
        }
        tmp.as_file().set_len(done)?;
        tmp.as_file().sync_all()?;
        progress.bytes_done(&label);
        Ok((format!("sha256:{}", hex::encode(hasher.finalize())), tmp))
    }

    fn read_index(&self) -> Result<BTreeMap<String, IndexEntry>> {
        read_json_state(&self.index_path)
    }

    fn write_index(&self, index: &BTreeMap<String, IndexEntry>) -> Result<()> {
        write_atomic(&self.index_path, &serde_json::to_vec_pretty(index)?, 0o600)
    }
}

fn read_full(input: &mut File, buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests;
