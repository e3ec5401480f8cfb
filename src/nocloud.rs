//! The cloud-init NoCloud seed disk ("cidata") for a VM.
//!
//! cloud-init's NoCloud datasource looks, at boot, for a block device whose file
//! system (vfat or iso9660) is labelled `cidata` or `CIDATA`, and reads the
//! files `meta-data`, `user-data` and, if present, `network-config` from its
//! root. [`write_seed`] builds such a disk image in-process: a small FAT12
//! volume labelled `CIDATA`, made with the `fatfs` crate, so no `mkisofs`,
//! `genisoimage` or `mkfs.vfat` is needed on the host.
//!
//! The image is a raw disk. Attach it read-only, on any bus the guest has a
//! driver for: for example a libvirt `<disk type='file' device='disk'>` with
//! `<driver name='qemu' type='raw'/>`, `<readonly/>` and a virtio target, or a
//! `device='cdrom'` on SATA. cloud-init finds it by its label alone.
//!
//! Every file is JSON, which is also YAML, so whatever the values contain
//! (quotes, `#`, `:`, leading spaces, non-ASCII) they reach cloud-init exactly as
//! given. `user-data` starts with the `#cloud-config` line cloud-init needs.
//!
//! The image is reproducible: the same [`Seed`] always gives the same bytes
//! (fixed time stamps, a volume serial number taken from the instance id).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::fsutil::sync_dir;

/// The file-system label cloud-init's NoCloud datasource looks for.
pub const LABEL: &str = "CIDATA";

/// Where in the guest the VM's `env` table is written, as `KEY=VALUE` lines,
/// owned by root and readable by root only (0600).
pub const GUEST_ENV_PATH: &str = "/etc/agentvm/env";

/// The `sudo` rule given to a non-root login user.
pub const SUDO_RULE: &str = "ALL=(ALL) NOPASSWD:ALL";

/// The smallest image written; it grows with the content (see [`image_size`]).
const MIN_IMAGE_SIZE: u64 = 1 << 20;

/// What the seed tells cloud-init. Nothing here is secret except, possibly, the
/// `env` values; the image is written 0600 for that reason.
#[derive(Debug, Clone, Copy)]
pub struct Seed<'a> {
    /// The guest's host name (`local-hostname` in meta-data, `hostname` in
    /// user-data).
    pub hostname: &'a str,
    /// The login user. `"root"` means root logs in with the keys; any other name
    /// is created as a passwordless-sudo user with a locked password, and the
    /// image's default user (e.g. `debian`) is not created.
    pub user: &'a str,
    /// OpenSSH public key lines allowed to log in as `user`.
    pub authorized_keys: &'a [String],
    /// Written as `KEY=VALUE` lines to [`GUEST_ENV_PATH`] (root only, 0600);
    /// no file is written when empty.
    pub env: &'a BTreeMap<String, String>,
    /// Whether the root partition and file system grow to fill the disk. When
    /// false, cloud-init's default growing is turned off explicitly.
    pub grow_root: bool,
    /// The `network-config` file (network config version 1 or 2), written as
    /// JSON; without it cloud-init brings up DHCP on the first NIC.
    pub network_config: Option<&'a Value>,
}

impl Seed<'_> {
    /// Refuses what cloud-init or the guest could misread: empty or
    /// multi-line names and keys, environment names that are not
    /// `[A-Za-z_][A-Za-z0-9_]*`, and environment values with a line break or
    /// NUL (the env file has one variable per line and no quoting, so such a
    /// value would smuggle in another variable). Tabs, quotes, `#`, `$`, `=`
    /// and non-ASCII text are kept verbatim.
    pub fn validate(&self) -> Result<()> {
        if self.hostname.is_empty()
            || !self
                .hostname
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            bail!(
                "seed: invalid host name {:?}: use letters, digits, '-' and '.'",
                self.hostname
            );
        }
        if self.user.is_empty() || self.user.chars().any(|c| c.is_control() || c == ':') {
            bail!("seed: invalid user name {:?}", self.user);
        }
        if let Some(key) = self
            .authorized_keys
            .iter()
            .find(|k| k.trim().is_empty() || k.chars().any(|c| c.is_control() && c != '\t'))
        {
            bail!("seed: an SSH key must be one non-empty line: {key:?}");
        }
        for (key, value) in self.env {
            if !crate::spec::is_env_key(key) {
                bail!("seed: invalid environment variable name {key:?}");
            }
            if value.contains(['\n', '\r', '\0']) {
                bail!("seed: the value of {key} contains a line break or NUL");
            }
        }
        Ok(())
    }

    /// The instance id cloud-init keys its per-instance state on: `iid-`
    /// followed by 32 hex digits of the SHA-256 of everything else in the seed
    /// (user-data, host name, network config). It is computed here rather than
    /// chosen by the caller so that it cannot go stale: any change to the seed
    /// gives a new id, and cloud-init then runs its per-instance modules again
    /// (users, keys, host name, write_files) on the next boot; an unchanged seed
    /// keeps its id, so rewriting it is harmless.
    pub fn instance_id(&self) -> Result<String> {
        let mut hash = Sha256::new();
        for part in [
            self.user_data()?,
            self.hostname.to_string(),
            self.network_config_file().unwrap_or_default(),
        ] {
            // Length-prefixed, so no two different seeds hash the same bytes.
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
        Ok(format!("iid-{}", &hex::encode(hash.finalize())[..32]))
    }

    /// The `meta-data` file: instance id and host name, as JSON.
    pub fn meta_data(&self) -> Result<String> {
        let meta = json!({
            "instance-id": self.instance_id()?,
            "local-hostname": self.hostname,
        });
        Ok(format!("{}\n", to_json(&meta)))
    }

    /// The `user-data` file: `#cloud-config` followed by JSON.
    pub fn user_data(&self) -> Result<String> {
        self.validate()?;
        let mut config = serde_json::Map::new();
        config.insert("hostname".into(), json!(self.hostname));
        config.insert("preserve_hostname".into(), json!(false));
        if self.user == "root" {
            // No `users` entry: the image's default user is not created, and
            // the top-level keys go to root, without the "please log in as ..."
            // prefix because root login is enabled.
            config.insert("users".into(), json!([]));
            config.insert("disable_root".into(), json!(false));
            config.insert("ssh_authorized_keys".into(), json!(self.authorized_keys));
        } else {
            // Only this user: leaving out "default" means the image's default
            // user (e.g. `debian`) is not created. Root stays disabled.
            config.insert(
                "users".into(),
                json!([{
                    "name": self.user,
                    "ssh_authorized_keys": self.authorized_keys,
                    "sudo": SUDO_RULE,
                    "shell": "/bin/bash",
                    "lock_passwd": true,
                }]),
            );
            config.insert("disable_root".into(), json!(true));
        }
        // A changed seed is a new instance to cloud-init, which by default then
        // makes new SSH host keys; agentvm pinned the first ones, so keep them.
        config.insert("ssh_deletekeys".into(), json!(false));
        if self.grow_root {
            config.insert(
                "growpart".into(),
                json!({ "mode": "auto", "devices": ["/"] }),
            );
            config.insert("resize_rootfs".into(), json!(true));
        } else {
            // cloud-init grows the root by default; say no explicitly.
            config.insert("growpart".into(), json!({ "mode": "off" }));
            config.insert("resize_rootfs".into(), json!(false));
        }
        if !self.env.is_empty() {
            config.insert(
                "write_files".into(),
                json!([{
                    "path": GUEST_ENV_PATH,
                    "owner": "root:root",
                    "permissions": "0600",
                    "content": self.env_file(),
                }]),
            );
        }
        Ok(format!(
            "#cloud-config\n{}\n",
            to_json(&Value::Object(config))
        ))
    }

    /// The content of [`GUEST_ENV_PATH`]: one `KEY=VALUE` line per variable,
    /// sorted by name, values verbatim. Only meaningful after [`Self::validate`].
    pub fn env_file(&self) -> String {
        self.env
            .iter()
            .map(|(key, value)| format!("{key}={value}\n"))
            .collect()
    }

    /// The `network-config` file, if any, as JSON.
    pub fn network_config_file(&self) -> Option<String> {
        self.network_config.map(|n| format!("{}\n", to_json(n)))
    }

    /// The files on the seed, by name, in the order they are written.
    pub fn files(&self) -> Result<Vec<(&'static str, String)>> {
        let mut files = vec![
            ("meta-data", self.meta_data()?),
            ("user-data", self.user_data()?),
        ];
        if let Some(network) = self.network_config_file() {
            files.push(("network-config", network));
        }
        Ok(files)
    }
}

/// Writes the seed image for `seed` to `path`: a raw FAT12 disk image labelled
/// [`LABEL`], mode 0600. It is written to a temp file in the same folder,
/// synced, and renamed into place, so `path` is always either the old image or
/// the complete new one.
pub fn write_seed(seed: &Seed, path: &Path) -> Result<()> {
    let files = seed.files()?;
    let instance_id = seed.instance_id()?;
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent folder", path.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    let content: usize = files.iter().map(|(_, text)| text.len()).sum();
    build_image(tmp.as_file_mut(), &files, image_size(content), &instance_id)
        .with_context(|| format!("building the cloud-init seed for {}", path.display()))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("replacing {}", path.display()))?;
    sync_dir(dir);
    Ok(())
}

/// The image size for files of `content` bytes in all: at least 1 MiB, and
/// always twice the content in whole MiB, which leaves room for FAT overhead
/// and cluster rounding while staying in FAT12/FAT16 territory.
pub fn image_size(content: usize) -> u64 {
    let twice = 2 * content as u64;
    MIN_IMAGE_SIZE.max(twice.div_ceil(MIN_IMAGE_SIZE) * MIN_IMAGE_SIZE)
}

/// Formats `file` as a FAT volume of `size` bytes and writes `files` into its
/// root folder.
fn build_image(
    file: &mut File,
    files: &[(&str, String)],
    size: u64,
    instance_id: &str,
) -> Result<()> {
    file.set_len(size)?;
    let serial = u32::from_le_bytes(
        Sha256::digest(instance_id.as_bytes())[..4]
            .try_into()
            .expect("4 bytes"),
    );
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    fatfs::format_volume(
        &mut *file,
        fatfs::FormatVolumeOptions::new()
            .volume_label(label)
            .volume_id(serial),
    )
    .context("formatting the FAT volume")?;
    file.seek(SeekFrom::Start(0))?;
    let fs = fatfs::FileSystem::new(&mut *file, fatfs::FsOptions::new())
        .context("opening the new FAT volume")?;
    {
        let root = fs.root_dir();
        for (name, text) in files {
            let mut out = root
                .create_file(name)
                .with_context(|| format!("creating {name}"))?;
            out.truncate()?;
            out.write_all(text.as_bytes())
                .with_context(|| format!("writing {name}"))?;
            out.flush()?;
        }
    }
    fs.unmount().context("closing the FAT volume")?;
    Ok(())
}

fn to_json(value: &Value) -> String {
    serde_json::to_string_pretty(value).expect("a JSON value always serializes")
}

#[cfg(test)]
mod tests;
