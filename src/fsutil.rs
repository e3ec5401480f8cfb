//! Small file-system helpers: atomic writes, JSON state files, private folders,
//! an exclusive lock.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;

/// Name prefixes of temp files agentvm writes before renaming them into place;
/// one still there after a crash is garbage.
pub const TEMP_PREFIXES: &[&str] = &[".tmp-", ".import-"];

/// Writes `data` to `path` through a temp file in the same folder and a rename,
/// so a reader (or a crash) sees either the old or the new file, never half of one.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent folder", path.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("replacing {}", path.display()))?;
    sync_dir(dir);
    Ok(())
}

/// `write_atomic` of a user's file: it keeps the mode the file has (`mode`
/// only for a new file).
pub fn write_atomic_keep_mode(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    write_atomic(path, data, existing_mode(path).unwrap_or(mode))
}

/// The permission bits of `path`, if it exists.
pub fn existing_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// Reads a JSON state file agentvm keeps. A missing file is the empty state
/// (`T::default()`); a file that exists but cannot be read or parsed is an error
/// naming the file and, for bad JSON, the line and column. Callers return that
/// error before writing anything, so a damaged file is left exactly as it is for
/// the user to repair or remove, never silently replaced by an empty one.
pub fn read_json_state<T: DeserializeOwned + Default>(path: &Path) -> Result<T> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(T::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "cannot parse {} (left untouched: fix or remove it)",
            path.display()
        )
    })
}

/// Best effort: makes a rename in `dir` durable.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Creates `dir` and its parents; the last component is made 0700.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// An exclusive advisory lock on a file, held until dropped.
pub struct FileLock {
    _lock: Flock<File>,
}

impl FileLock {
    /// Blocks until the lock on `path` is ours.
    pub fn acquire(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(Self { _lock: lock })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_missing_state_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let state: BTreeMap<String, u32> = read_json_state(&dir.path().join("none.json")).unwrap();
        assert!(state.is_empty());
    }

    #[test]
    fn a_state_file_is_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, r#"{"a": 1}"#).unwrap();
        let state: BTreeMap<String, u32> = read_json_state(&path).unwrap();
        assert_eq!(state, BTreeMap::from([("a".to_string(), 1)]));
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, "{\n  \"a\": 1,\n  oops\n}").unwrap();
        let err = read_json_state::<BTreeMap<String, u32>>(&path).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("line 3 column 3"), "{text}");
        // The right JSON with the wrong shape is an error too.
        fs::write(&path, "[1, 2]").unwrap();
        let text = format!(
            "{:#}",
            read_json_state::<BTreeMap<String, u32>>(&path).unwrap_err()
        );
        assert!(text.contains("invalid type"), "{text}");
    }

    #[test]
    fn an_unreadable_state_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::create_dir(&path).unwrap();
        let err = read_json_state::<BTreeMap<String, u32>>(&path).unwrap_err();
        assert!(
            format!("{err:#}").contains(&path.display().to_string()),
            "{err:#}"
        );
    }
}
