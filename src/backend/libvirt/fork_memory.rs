//! Where `fork` writes the memory snapshot it restores its forks from.
//!
//! The snapshot is written once, copied for each fork restored beside
//! another, read once per fork and deleted, so it goes
//! where RAM holds it: the runtime folder when that is a tmpfs (as
//! `$XDG_RUNTIME_DIR` is under systemd), else a private folder in `/dev/shm`.
//! Written to a disk instead, a snapshot of the tiny test guest took twice as
//! long (0.43 s against 0.2 s here) and so kept its source paused longer.
//! When RAM has no room for every copy (the source's memory size, once per
//! fork, with as much again left free for the forks themselves, and a tenth
//! of the tmpfs to spare), the files go in the VM folders; `fork` also falls
//! back to them when the snapshot to RAM fails (RAM filled up meanwhile).
//! Files in RAM older than an hour were left by a daemon that died during a
//! fork, and are removed.

use std::path::{Path, PathBuf};

use nix::sys::statfs::{TMPFS_MAGIC, statfs};
use nix::sys::statvfs::statvfs;

use crate::paths::{FORK_MEMORY_SHM_DIR, RUNTIME_DIR, VM_FORK_MEMORY_FILE};

/// The folder the memory snapshot (and each fork's copy of it) is written in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MemoryFiles {
    /// The folder in RAM, or `None` for each VM's own folder.
    dir: Option<PathBuf>,
}

impl MemoryFiles {
    /// Picks the folder for the snapshot of a guest with `guest_bytes` of
    /// memory forked into `forks` (a copy each): `runtime_dir` or
    /// `/dev/shm/agentvm-<uid>` if one is in RAM with room, else the VMs'
    /// own folders.
    pub fn choose(runtime_dir: &Path, guest_bytes: u64, forks: u64) -> Self {
        Self::choose_in(
            runtime_dir,
            Path::new(FORK_MEMORY_SHM_DIR),
            guest_bytes,
            forks,
        )
    }

    /// [`Self::choose`], with `shm` in place of `/dev/shm`.
    fn choose_in(runtime_dir: &Path, shm: &Path, guest_bytes: u64, forks: u64) -> Self {
        let need = guest_bytes.saturating_mul(forks.max(1));
        let keep_free = need;
        for dir in [runtime_dir.to_path_buf(), own_folder_in(shm)] {
            match in_ram_with_room(&dir, need, keep_free) {
                Ok(true) => {
                    sweep(&dir);
                    return Self { dir: Some(dir) };
                }
                Ok(false) => {}
                // A folder in RAM that cannot be used (not private, say):
                // the fork is slower on disk, and says why.
                Err(e) => tracing::warn!(
                    "{}: not used for the fork's memory snapshot: {e:#}",
                    dir.display()
                ),
            }
        }
        Self { dir: None }
    }

    /// The VMs' own folders.
    pub fn on_disk() -> Self {
        Self { dir: None }
    }

    /// The file the snapshot of VM `name` (or the copy fork `name` is
    /// restored from) is written to; `vm_dir` is that VM's folder.
    pub fn file(&self, name: &str, vm_dir: &Path) -> PathBuf {
        match &self.dir {
            Some(dir) => dir.join(format!("{name}.{VM_FORK_MEMORY_FILE}")),
            None => vm_dir.join(VM_FORK_MEMORY_FILE),
        }
    }

    pub fn in_ram(&self) -> bool {
        self.dir.is_some()
    }
}

/// This user's folder in `shm`: `agentvm-<uid>`.
fn own_folder_in(shm: &Path) -> PathBuf {
    let uid = nix::unistd::getuid().as_raw();
    shm.join(format!("{RUNTIME_DIR}-{uid}"))
}

/// Whether `dir` is on a tmpfs with `need` bytes free there (and a tenth of
/// it left over, for what else uses it), and the machine's available memory
/// has them plus `keep_free`. `dir` is made (0700, this user's) if missing.
fn in_ram_with_room(dir: &Path, need: u64, keep_free: u64) -> anyhow::Result<bool> {
    let parent = dir.parent().unwrap_or(dir);
    let fs = statfs(parent)?;
    if fs.filesystem_type() != TMPFS_MAGIC {
        return Ok(false);
    }
    let room = statvfs(parent)?;
    let block = room.fragment_size() as u64;
    let free = room.blocks_available() as u64 * block;
    let margin = room.blocks() as u64 * block / 10;
    if free < need.saturating_add(margin) || available_memory()? < need.saturating_add(keep_free) {
        return Ok(false);
    }
    crate::paths::private_dir(dir)?;
    Ok(true)
}

/// How old a memory file left in RAM must be to count as left behind (a
/// daemon that died during a fork); a fork takes seconds.
const LEFT_BEHIND: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the memory files in `dir` older than [`LEFT_BEHIND`]: in RAM,
/// nothing else ever would.
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > LEFT_BEHIND));
        let ours = path.file_name().is_some_and(|n| {
            n.to_string_lossy()
                .ends_with(&format!(".{VM_FORK_MEMORY_FILE}"))
        });
        if ours && stale {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!("removed {}, left behind by a fork", path.display()),
                Err(e) => tracing::warn!("removing {}: {e}", path.display()),
            }
        }
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn available_memory() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    parse_mem_available(&text).ok_or_else(|| anyhow::anyhow!("no MemAvailable in /proc/meminfo"))
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_old_memory_files_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join(format!("a.{VM_FORK_MEMORY_FILE}"));
        let new = tmp.path().join(format!("b.{VM_FORK_MEMORY_FILE}"));
        let other = tmp.path().join("a.qga");
        for file in [&old, &new, &other] {
            std::fs::write(file, b"x").unwrap();
        }
        let long_ago = std::time::SystemTime::now() - LEFT_BEHIND * 2;
        for file in [&old, &other] {
            std::fs::File::options()
                .write(true)
                .open(file)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        sweep(tmp.path());
        assert!(!old.exists(), "an old memory file is removed");
        assert!(new.exists(), "a fork in progress keeps its file");
        assert!(other.exists(), "other files are not touched");
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       24683664 kB\nMemFree:        22288184 kB\nMemAvailable:   23899156 kB\n";
        assert_eq!(parse_mem_available(text), Some(23_899_156 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    fn on_tmpfs(dir: &Path) -> bool {
        statfs(dir).map(|fs| fs.filesystem_type()) == Ok(TMPFS_MAGIC)
    }

    #[test]
    fn a_runtime_folder_on_disk_is_not_used() {
        let tmp = tempfile::tempdir().unwrap();
        // Only where the temporary folder is on a disk.
        if on_tmpfs(tmp.path()) {
            return;
        }
        assert!(!in_ram_with_room(&tmp.path().join("run"), 1, 1).unwrap());
        assert!(!tmp.path().join("run").exists(), "nothing is made there");
    }

    #[test]
    fn without_room_in_ram_the_vm_folder_is_used() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = tmp.path().join("vm");
        let chosen = MemoryFiles::choose(&tmp.path().join("run"), u64::MAX / 4, 4);
        assert!(!chosen.in_ram());
        assert_eq!(chosen.file("src", &vm), vm.join(VM_FORK_MEMORY_FILE));
    }

    #[test]
    fn ram_is_used_when_it_has_room() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        // A fresh stand-in for /dev/shm, so what other runs left there
        // cannot decide the outcome.
        if !on_tmpfs(Path::new(FORK_MEMORY_SHM_DIR)) {
            return;
        }
        let shm = tempfile::tempdir_in(FORK_MEMORY_SHM_DIR).unwrap();
        let chosen = MemoryFiles::choose_in(&run, shm.path(), 4096, 2);
        assert!(chosen.in_ram());
        let dir = if on_tmpfs(tmp.path()) {
            run
        } else {
            own_folder_in(shm.path())
        };
        assert_eq!(
            chosen.file("a", Path::new("/x")),
            dir.join(format!("a.{VM_FORK_MEMORY_FILE}"))
        );
    }

    #[test]
    fn a_folder_in_ram_that_is_not_private_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        if !on_tmpfs(Path::new(FORK_MEMORY_SHM_DIR)) {
            return;
        }
        let shm = tempfile::tempdir_in(FORK_MEMORY_SHM_DIR).unwrap();
        let ours = own_folder_in(shm.path());
        std::fs::create_dir(&ours).unwrap();
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o755)).unwrap();
        let disk = tempfile::tempdir().unwrap();
        if on_tmpfs(disk.path()) {
            return;
        }
        let chosen = MemoryFiles::choose_in(&disk.path().join("run"), shm.path(), 4096, 1);
        assert!(!chosen.in_ram(), "a folder others can read is refused");
    }
}
