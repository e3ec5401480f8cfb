//! Where agentvm keeps things. Every file and folder name the store uses is a
//! constant here, so the on-disk layout can be read in one place.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Environment variable that overrides the data folder.
pub const ENV_HOME: &str = "AGENTVM_HOME";
/// Environment variable that names the fleet file.
pub const ENV_FILE: &str = "AGENTVM_FILE";
/// Environment variable that names the libvirt URI.
pub const ENV_LIBVIRT_URI: &str = "AGENTVM_LIBVIRT_URI";
/// Environment variable that forces the accelerator (`auto`, `kvm`, `tcg`).
pub const ENV_ACCEL: &str = "AGENTVM_ACCEL";
/// Environment variable that forces the user-mode network (`passt`, `slirp`).
pub const ENV_NETWORK: &str = "AGENTVM_NETWORK";
/// Environment variable naming a step at which the process kills itself (tests).
pub const ENV_FAILPOINT: &str = "AGENTVM_FAILPOINT";
/// Environment variable naming the `nix` program to build flake images with.
pub const ENV_NIX: &str = "AGENTVM_NIX";
/// Environment variable naming the `nixos-rebuild` program `agentvm provision` runs.
pub const ENV_NIXOS_REBUILD: &str = "AGENTVM_NIXOS_REBUILD";
/// Environment variable naming the `sops` program `agentvm deploy` and
/// `retire` run (else `sops` on PATH).
pub const ENV_SOPS: &str = "AGENTVM_SOPS";
/// Environment variable that overrides the daemon socket path.
pub const ENV_SOCKET: &str = "AGENTVM_SOCKET";
/// The virtiofsd to run for shared folders (else `virtiofsd` on `$PATH`).
pub const ENV_VIRTIOFSD: &str = "AGENTVM_VIRTIOFSD";
/// Environment variable: how long an idle daemon waits before it exits
/// (`15m`, `30s`, `1h`; `0` or `off`: never). `agentvm daemon --idle-exit` is the same.
pub const ENV_DAEMON_IDLE_EXIT: &str = "AGENTVM_DAEMON_IDLE_EXIT";

/// The fleet file searched for in the current folder and its parents.
pub const FLEET_FILE: &str = "agentvm.toml";

/// `$AGENTVM_HOME/images`: imported base images, kernels and initrds by digest.
pub const IMAGES_DIR: &str = "images";
/// `$AGENTVM_HOME/images/index.json`: path+size+mtime → digest, for instant re-import.
pub const IMAGE_INDEX_FILE: &str = "index.json";
/// `$AGENTVM_HOME/images/builds.json`: which flake inputs built which image.
pub const BUILDS_FILE: &str = "builds.json";
/// `$AGENTVM_HOME/images/.lock`: held while importing.
pub const STORE_LOCK_FILE: &str = ".lock";
/// `$AGENTVM_HOME/vms`: one folder per local VM.
pub const VMS_DIR: &str = "vms";
/// `$AGENTVM_HOME/vms/NAME/disk.qcow2`: the VM's thin overlay.
pub const VM_DISK_FILE: &str = "disk.qcow2";
/// `$AGENTVM_HOME/vms/NAME/serial.log`: the serial console log.
pub const VM_SERIAL_LOG_FILE: &str = "serial.log";
/// `$AGENTVM_HOME/vms/NAME/agentvm.env`: the VM's env as `KEY=VALUE` lines
/// (mode 0600), rewritten before each start and read by QEMU through fw_cfg.
pub const VM_ENV_FILE: &str = "agentvm.env";
/// `$AGENTVM_HOME/vms/NAME/cidata.img`: the NoCloud seed disk of a VM whose
/// image has `cloud_init = true` (mode 0600: it holds the env), rewritten
/// before each start.
pub const VM_SEED_FILE: &str = "cidata.img";
/// `$AGENTVM_HOME/vms/NAME/known_hosts`: the VM's own SSH known_hosts.
pub const VM_KNOWN_HOSTS_FILE: &str = "known_hosts";
/// `$AGENTVM_HOME/vms/NAME/pinned_host_key`: the host key `agentvm hostkey` pinned;
/// while it exists `agentvm ssh` checks host keys strictly.
pub const VM_PINNED_HOST_KEY_FILE: &str = "pinned_host_key";
/// `$AGENTVM_HOME/vms/NAME/disk-<unix ms>.qcow2`: the writable top a VM gets
/// when it is forked; its former top (`disk.qcow2` or an older `disk-*`)
/// becomes a read-only layer its forks share. Which file is a VM's top is in
/// its domain metadata (`<agentvm:disk>`).
pub const VM_FORK_TOP_PREFIX: &str = "disk-";
/// `<runtime dir>/NAME.fork-memory.save`: the memory snapshot of VM NAME that
/// its forks are restored from (a libvirt save image), or the copy fork NAME
/// is restored from when several are; removed once they run. It is written
/// where RAM holds it when there is room (the runtime folder if that is a
/// tmpfs, else [`FORK_MEMORY_SHM_DIR`]), else as
/// `$AGENTVM_HOME/vms/NAME/fork-memory.save`.
pub const VM_FORK_MEMORY_FILE: &str = "fork-memory.save";
/// `/dev/shm`: the tmpfs whose `agentvm-<uid>/` folder holds fork memory
/// snapshots when the runtime folder is not in RAM (no `$XDG_RUNTIME_DIR` on
/// a tmpfs). On a disk, writing a snapshot took about twice as long, and it is
/// read only once. Files there older than an hour (left by a daemon that died
/// during a fork) are removed by the next fork.
pub const FORK_MEMORY_SHM_DIR: &str = "/dev/shm";
/// `$AGENTVM_HOME/secrets.json`: the recipients `secrets rekey` added, per VM.
pub const SECRETS_RECORD_FILE: &str = "secrets.json";
/// `$AGENTVM_HOME/deploys/NAME.json`: how far `agentvm deploy NAME` got (the
/// step that failed, sops files still to re-encrypt, the host key it pinned),
/// so the next `deploy` resumes there. `retire` removes it.
pub const DEPLOYS_DIR: &str = "deploys";
/// `$AGENTVM_HOME/remote/BACKEND/NAME/`: local files of VMs on remote backends.
pub const REMOTE_DIR: &str = "remote";
/// `$AGENTVM_HOME/remote/BACKEND/vmids.json`: the names of the backend's VMs
/// by VMID, so a VM on an offline node (which Proxmox lists without its name)
/// is still known.
pub const REMOTE_VMIDS_FILE: &str = "vmids.json";
/// `$AGENTVM_HOME/ssh`: agentvm's own SSH identity.
pub const SSH_DIR: &str = "ssh";
/// `$AGENTVM_HOME/ssh/id_ed25519` (and `.pub`).
pub const SSH_KEY_FILE: &str = "id_ed25519";
/// `<runtime dir>/lock`: held while a command changes VMs, ports or the store.
/// It is per user, not per data folder: ports and libvirt's session are per user
/// (as are the guest agent sockets); the daemon's socket and pid file are per home.
pub const LOCK_FILE: &str = "lock";
/// `<runtime dir>/<home key>/`: the folder of one home's daemon, named by the
/// first this many hex digits of the SHA-256 of the home's canonical path.
pub const HOME_KEY_HEX_DIGITS: usize = 16;
/// `<runtime dir>/<home key>/agentvm.sock`: the daemon's socket, one per home
/// (`AGENTVM_SOCKET` overrides).
pub const SOCKET_FILE: &str = "agentvm.sock";
/// Beside the socket, with this extension: the daemon's flocked pid file.
pub const PID_EXTENSION: &str = "pid";
/// The longest path a UNIX socket may have (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// The systemd user unit written by `agentvm daemon --install-unit`.
pub const UNIT_FILE: &str = "agentvm.service";
/// `$AGENTVM_HOME/daemon.log`: where a daemon started on demand logs.
pub const DAEMON_LOG_FILE: &str = "daemon.log";
/// `<runtime dir>/NAME.qga`: a VM's guest agent socket.
pub const GUEST_AGENT_SOCKET_SUFFIX: &str = ".qga";
/// `<runtime dir>/<vm>.<tag>.sock`: a shared folder's virtiofsd socket.
pub const SHARE_SOCKET_SUFFIX: &str = ".sock";
/// `<runtime dir>/<vm>.<tag>.pid`: the pid of the virtiofsd serving that socket.
pub const SHARE_PID_SUFFIX: &str = ".pid";
/// `vms/NAME/virtiofsd-<tag>.log`: what a share's virtiofsd said.
pub const VM_SHARE_LOG_PREFIX: &str = "virtiofsd-";
/// A VM's egress proxy socket in the daemon's socket folder:
/// `egress-<vm>.sock`, made and removed by the daemon.
pub const EGRESS_SOCKET_PREFIX: &str = "egress-";
pub const EGRESS_SOCKET_SUFFIX: &str = ".sock";
/// The per-user runtime folder's name under `$XDG_RUNTIME_DIR` (or, with
/// `-<uid>` appended, under the temp folder).
pub const RUNTIME_DIR: &str = "agentvm";

/// The agentvm data folder and the paths inside it.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `$AGENTVM_HOME`, else `$XDG_DATA_HOME/agentvm`, else `~/.local/share/agentvm`.
    pub fn from_env() -> Result<Self> {
        if let Some(dir) = non_empty_env(ENV_HOME) {
            return Ok(Self::at(dir));
        }
        if let Some(dir) = non_empty_env("XDG_DATA_HOME") {
            return Ok(Self::at(Path::new(&dir).join("agentvm")));
        }
        let Some(home) = non_empty_env("HOME") else {
            bail!("cannot find a data folder: set {ENV_HOME}, XDG_DATA_HOME or HOME");
        };
        Ok(Self::at(Path::new(&home).join(".local/share/agentvm")))
    }

    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the data folder (0700) if it is missing.
    pub fn ensure(&self) -> Result<()> {
        crate::fsutil::create_private_dir(&self.root)
            .with_context(|| format!("creating data folder {}", self.root.display()))
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join(IMAGES_DIR)
    }

    pub fn image_index(&self) -> PathBuf {
        self.images_dir().join(IMAGE_INDEX_FILE)
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.root.join(VMS_DIR)
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.vms_dir().join(name)
    }

    pub fn vm_disk(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(VM_DISK_FILE)
    }

    /// The writable top a fork of `name` made at `stamp` gives it.
    pub fn vm_fork_top(&self, name: &str, stamp: u128) -> PathBuf {
        self.vm_dir(name)
            .join(format!("{VM_FORK_TOP_PREFIX}{stamp}.qcow2"))
    }

    pub fn vm_serial_log(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(VM_SERIAL_LOG_FILE)
    }

    pub fn vm_env_file(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(VM_ENV_FILE)
    }

    pub fn vm_seed(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(VM_SEED_FILE)
    }

    /// The log of the virtiofsd serving the share with mount tag `tag`.
    pub fn vm_share_log(&self, name: &str, tag: &str) -> PathBuf {
        self.vm_dir(name)
            .join(format!("{VM_SHARE_LOG_PREFIX}{tag}.log"))
    }

    pub fn vm_known_hosts(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(VM_KNOWN_HOSTS_FILE)
    }

    pub fn daemon_log(&self) -> PathBuf {
        self.root.join(DAEMON_LOG_FILE)
    }

    pub fn vm_pinned_host_key(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join(VM_PINNED_HOST_KEY_FILE)
    }

    pub fn secrets_record(&self) -> PathBuf {
        self.root.join(SECRETS_RECORD_FILE)
    }

    pub fn deploy_state(&self, name: &str) -> PathBuf {
        self.root.join(DEPLOYS_DIR).join(format!("{name}.json"))
    }

    pub fn ssh_dir(&self) -> PathBuf {
        self.root.join(SSH_DIR)
    }

    pub fn ssh_key(&self) -> PathBuf {
        self.ssh_dir().join(SSH_KEY_FILE)
    }
}

pub fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The per-user runtime folder: `$XDG_RUNTIME_DIR/agentvm`, else
/// `/tmp/agentvm-<uid>`. It is created 0700; one that another user owns or
/// others can write to is refused rather than trusted.
pub fn runtime_dir() -> Result<PathBuf> {
    let uid = nix::unistd::getuid().as_raw();
    let dir = match non_empty_env("XDG_RUNTIME_DIR") {
        Some(base) => Path::new(&base).join(RUNTIME_DIR),
        None => std::env::temp_dir().join(format!("{RUNTIME_DIR}-{uid}")),
    };
    private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` 0700 if it is missing, and makes sure it is this user's own:
/// a folder that another user owns or others can use is refused rather than
/// trusted (it may sit in a folder everyone can write to).
pub fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let uid = nix::unistd::getuid().as_raw();
    crate::fsutil::create_private_dir(dir)?;
    let meta =
        std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} must be a folder owned by uid {uid} with mode 0700; refusing to use it",
            dir.display()
        );
    }
    Ok(())
}

/// The per-user lock file (see [`LOCK_FILE`]).
pub fn lock_file() -> Result<PathBuf> {
    Ok(runtime_dir()?.join(LOCK_FILE))
}

/// The canonical path of `home` (symlinks resolved), also while (part of)
/// it does not exist yet: the longest existing ancestor is resolved.
pub fn canonical_home(home: &Home) -> Result<PathBuf> {
    let root = std::path::absolute(home.root())
        .with_context(|| format!("making {} an absolute path", home.root().display()))?;
    let mut rest = Vec::new();
    let mut base = root.as_path();
    loop {
        match std::fs::canonicalize(base) {
            Ok(found) => {
                return Ok(rest.iter().rev().fold(found, |path, part| path.join(part)));
            }
            Err(_) => match (base.parent(), base.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_os_string());
                    base = parent;
                }
                _ => return Ok(root),
            },
        }
    }
}

/// The short name of a home's daemon folder: see [`HOME_KEY_HEX_DIGITS`].
pub fn home_key(canonical: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    hex::encode(digest)[..HOME_KEY_HEX_DIGITS].to_string()
}

/// Whether the daemon socket is forced by `AGENTVM_SOCKET`.
pub fn socket_forced() -> bool {
    non_empty_env(ENV_SOCKET).is_some()
}

/// The daemon's socket for `home`: `$AGENTVM_SOCKET`, else
/// `<runtime dir>/<home key>/agentvm.sock` (one daemon per home). Its folder
/// is not created here.
pub fn socket_path(home: &Home) -> Result<PathBuf> {
    let path = match non_empty_env(ENV_SOCKET) {
        Some(path) => PathBuf::from(path),
        None => runtime_dir()?
            .join(home_key(&canonical_home(home)?))
            .join(SOCKET_FILE),
    };
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        bail!(
            "the daemon socket path {} is longer than UNIX sockets allow ({MAX_SOCKET_PATH} bytes); \
             set XDG_RUNTIME_DIR to a shorter folder, or {ENV_SOCKET} to a shorter path",
            path.display()
        );
    }
    Ok(path)
}

/// A VM's egress proxy socket, beside the daemon's socket.
pub fn egress_socket(daemon_socket: &Path, vm: &str) -> PathBuf {
    daemon_socket.with_file_name(format!("{EGRESS_SOCKET_PREFIX}{vm}{EGRESS_SOCKET_SUFFIX}"))
}

/// The daemon's pid file, beside its socket.
pub fn pid_file(socket: &Path) -> PathBuf {
    socket.with_extension(PID_EXTENSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_home_has_one_key_however_it_is_spelled() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // Homes that do not exist yet resolve too.
        let direct = canonical_home(&Home::at(real.join("home/agentvm"))).unwrap();
        let linked = canonical_home(&Home::at(link.join("home/agentvm"))).unwrap();
        assert_eq!(direct, linked);
        assert!(
            direct.ends_with("real/home/agentvm"),
            "{}",
            direct.display()
        );
        assert_eq!(home_key(&direct), home_key(&linked));
        assert_eq!(home_key(&direct).len(), HOME_KEY_HEX_DIGITS);
        assert_ne!(home_key(&direct), home_key(&direct.join("other")));
    }
}
