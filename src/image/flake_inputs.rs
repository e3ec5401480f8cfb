//! The key that decides whether a flake image must be built again: a hash of
//! the flake reference and of every local file its evaluation may read.
//!
//! # The rule
//!
//! Only a path flake (`/abs/dir#attr`) with a `flake.lock` in its folder (the
//! flake root) has a key; for any other flake agentvm cannot tell what changed,
//! so it builds every time. The key is the sha256 of the flake reference and of
//! the path and content of:
//!
//! 1. every `*.nix` file and every `flake.lock` under the flake root;
//! 2. every file or folder a hashed `.nix` file names with a relative path
//!    literal (`./foo.json`, `../x/y.sh`, `./hosts`, `./hosts + "/${name}"`),
//!    resolved against that `.nix` file's folder, inside the flake root or
//!    not. A named folder stands for every file in it; a literal cut short by
//!    an interpolation (`./data-${name}.json`) stands for the folder it is in.
//!    Named `.nix` files are scanned for literals in turn.
//!
//! Walking folders skips hidden folders (`.git`, `.direnv`…), `target` folders
//! and `result`/`result-*` symlinks (Nix's and Cargo's outputs); symlinks are
//! hashed as where they point, never followed. A named file that does not exist
//! (or cannot be read) is hashed as such, so creating (or fixing) it changes the
//! key too.
//!
//! The scan for literals is textual: a path written in a comment or a string
//! counts as well, which only ever makes agentvm build when it did not need to.
//! One exception keeps edits to the rest of a project (its README, its Rust
//! sources) from rebuilding its images: a named folder that holds the flake
//! root itself (`src = ./.;`, `../.`) adds nothing beyond rule 1. An image
//! that bakes in a package built from the whole project needs
//! `agentvm image build --rebuild` after changes to that package's non-Nix files.
//!
//! At most [`MAX_FILES`] files are hashed and [`MAX_ENTRIES`] folder entries
//! looked at; a flake that needs more has no key, and is built every time.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// The lock file that pins a flake's inputs.
pub const FLAKE_LOCK_FILE: &str = "flake.lock";
/// The most files a key covers.
pub const MAX_FILES: usize = 10_000;
/// The most folder entries looked at while finding them.
pub const MAX_ENTRIES: usize = 200_000;

/// Why a flake has no key (and is built every time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoKey {
    #[error("not a local path flake, so nothing to compare with")]
    NotLocal,
    #[error("no local flake.lock to compare with")]
    NoLock,
    #[error("more than {MAX_FILES} files (or {MAX_ENTRIES} folder entries) to compare")]
    TooLarge,
}

/// The key of `flake_ref`'s build inputs (see the module documentation for
/// which files it covers).
pub fn inputs_key(flake_ref: &str) -> Result<String, NoKey> {
    key_within(flake_ref, MAX_FILES, MAX_ENTRIES)
}

fn key_within(flake_ref: &str, max_files: usize, max_entries: usize) -> Result<String, NoKey> {
    let source = flake_ref.split_once('#').map_or(flake_ref, |(s, _)| s);
    if !source.starts_with('/') {
        return Err(NoKey::NotLocal);
    }
    let root = normalize(Path::new(source));
    if !root.join(FLAKE_LOCK_FILE).is_file() {
        return Err(NoKey::NoLock);
    }
    let mut inputs = Inputs {
        root: root.clone(),
        seen: BTreeMap::new(),
        pending: Vec::new(),
        entries: 0,
        max_files,
        max_entries,
    };
    inputs.walk(&root, true)?;
    while let Some(path) = inputs.pending.pop() {
        inputs.add(&path)?;
    }

    let mut hasher = Sha256::new();
    hasher.update(b"agentvm flake inputs 2\0");
    hasher.update(flake_ref.as_bytes());
    hasher.update(b"\0");
    for (path, seen) in &inputs.seen {
        hasher.update(path.as_os_str().as_bytes());
        hasher.update(b"\0");
        match seen {
            Seen::File(digest) => {
                hasher.update(b"f");
                hasher.update(digest);
            }
            Seen::Link(target) => {
                hasher.update(b"l");
                hasher.update(target.as_os_str().as_bytes());
            }
            Seen::Folder => hasher.update(b"d"),
            Seen::Missing => hasher.update(b"m"),
            Seen::Unreadable(kind) => {
                hasher.update(b"u");
                hasher.update(kind.as_bytes());
            }
        }
        hasher.update(b"\0");
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// What the key records of one path.
enum Seen {
    /// The sha256 of a regular file's content.
    File([u8; 32]),
    /// A symlink's target.
    Link(PathBuf),
    /// A named folder (its files are recorded on their own).
    Folder,
    Missing,
    /// The path exists but cannot be read (the error kind).
    Unreadable(String),
}

struct Inputs {
    root: PathBuf,
    seen: BTreeMap<PathBuf, Seen>,
    /// Paths named by `.nix` files, not yet recorded.
    pending: Vec<PathBuf>,
    entries: usize,
    max_files: usize,
    max_entries: usize,
}

impl Inputs {
    /// Records the files under `dir`: with `nix_only`, the `.nix` files and
    /// lock files (rule 1); else all of them (a folder named by a `.nix` file).
    fn walk(&mut self, dir: &Path, nix_only: bool) -> Result<(), NoKey> {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let listing = match std::fs::read_dir(&dir) {
                Ok(listing) => listing,
                Err(e) => {
                    self.record(dir, Seen::Unreadable(format!("{:?}", e.kind())))?;
                    continue;
                }
            };
            for entry in listing {
                self.entries += 1;
                if self.entries > self.max_entries {
                    return Err(NoKey::TooLarge);
                }
                let Ok(entry) = entry else { continue };
                let path = entry.path();
                let name = entry.file_name();
                let Ok(kind) = entry.file_type() else {
                    self.pending.push(path);
                    continue;
                };
                if kind.is_dir() {
                    if !skipped_folder(&name) {
                        stack.push(path);
                    }
                } else if kind.is_symlink() && is_result_link(&name) {
                    continue;
                } else if !nix_only || is_nix(&name) || name == FLAKE_LOCK_FILE {
                    self.pending.push(path);
                }
            }
        }
        Ok(())
    }

    /// Records one path: a file's content (scanning a `.nix` file for the paths
    /// it names), a symlink's target, a folder's files, or that it is missing.
    fn add(&mut self, path: &Path) -> Result<(), NoKey> {
        if self.seen.contains_key(path) {
            return Ok(());
        }
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return self.record(path.to_path_buf(), Seen::Missing);
            }
            Err(e) => {
                return self.record(
                    path.to_path_buf(),
                    Seen::Unreadable(format!("{:?}", e.kind())),
                );
            }
        };
        if meta.is_symlink() {
            let target = std::fs::read_link(path).unwrap_or_default();
            return self.record(path.to_path_buf(), Seen::Link(target));
        }
        if meta.is_dir() {
            self.record(path.to_path_buf(), Seen::Folder)?;
            // A folder holding the flake root stands for the whole project:
            // rule 1 covers what of it is Nix.
            if !self.root.starts_with(path) {
                self.walk(path, false)?;
            }
            return Ok(());
        }
        let content = match std::fs::read(path) {
            Ok(content) => content,
            Err(e) => {
                return self.record(
                    path.to_path_buf(),
                    Seen::Unreadable(format!("{:?}", e.kind())),
                );
            }
        };
        if path.file_name().is_some_and(is_nix) {
            let dir = path.parent().unwrap_or(Path::new("/"));
            for literal in path_literals(&String::from_utf8_lossy(&content)) {
                self.pending.push(normalize(&dir.join(literal)));
            }
        }
        self.record(
            path.to_path_buf(),
            Seen::File(Sha256::digest(&content).into()),
        )
    }

    fn record(&mut self, path: PathBuf, seen: Seen) -> Result<(), NoKey> {
        self.seen.insert(path, seen);
        if self.seen.len() > self.max_files {
            return Err(NoKey::TooLarge);
        }
        Ok(())
    }
}

fn is_nix(name: &OsStr) -> bool {
    name.as_bytes().ends_with(b".nix")
}

/// Hidden folders and build outputs are not searched.
fn skipped_folder(name: &OsStr) -> bool {
    name.as_bytes().starts_with(b".") || name == "target"
}

/// `result`, `result-bin`…: the links `nix build` leaves.
fn is_result_link(name: &OsStr) -> bool {
    name == "result" || name.as_bytes().starts_with(b"result-")
}

/// A character of a Nix path literal.
fn is_path_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'+')
}

/// The relative path literals (`./x`, `../x/y`) in Nix source, as written
/// without a trailing slash. A literal followed by an interpolation (`./a-${b}`)
/// is cut back to its folder (`.`).
fn path_literals(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts_token =
            bytes[i] == b'.' && (i == 0 || !(is_path_char(bytes[i - 1]) || bytes[i - 1] == b'/'));
        if !starts_token {
            i += 1;
            continue;
        }
        let mut end = i;
        while end < bytes.len() && (is_path_char(bytes[end]) || bytes[end] == b'/') {
            end += 1;
        }
        let mut token = &text[i..end];
        if token.starts_with("./") || token.starts_with("../") {
            if text[end..].starts_with("${") {
                token = &token[..=token.rfind('/').unwrap_or(0)];
            }
            let trimmed = token.trim_end_matches('/');
            found.push(if trimmed.is_empty() { "." } else { trimmed }.to_string());
        }
        i = end.max(i + 1);
    }
    found
}

/// `path` with `.` and `..` resolved by name, not by following symlinks (as
/// Nix resolves path literals).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// A flake like agentvm's own: hosts, a shared module, data files, a README.
    fn project() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(&root.join("flake.lock"), "{\"version\": 7}");
        write(
            &root.join("flake.nix"),
            "{ outputs = { self, nixpkgs }: {\n  nixosConfigurations.a = nixpkgs.lib.nixosSystem {\n    modules = [ (./hosts + \"/a\") ];\n  };\n  packages.x.tool = build { src = ./.; };\n}; }\n",
        );
        write(
            &root.join("hosts/a/default.nix"),
            "{ ... }: { imports = [ ../common/base.nix ]; }\n",
        );
        write(
            &root.join("hosts/common/base.nix"),
            "{ ... }: {\n  users.motd = builtins.readFile ./motd.txt;\n  environment.etc.\"tool.json\".source = ../../config/tool.json;\n  environment.etc.\"keys\".source = ../../keys;\n}\n",
        );
        write(&root.join("hosts/common/motd.txt"), "hello\n");
        write(&root.join("config/tool.json"), "{}\n");
        write(&root.join("keys/a.pub"), "ssh-ed25519 AAAA a\n");
        write(&root.join("README.md"), "# the project\n");
        write(&root.join("src/main.rs"), "fn main() {}\n");
        write(&root.join("notes/todo.txt"), "later\n");
        let flake = format!("{}#a-image", root.display());
        (dir, flake)
    }

    #[test]
    fn only_local_locked_flakes_have_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let flake = format!("{}#base", dir.path().display());
        assert_eq!(inputs_key(&flake), Err(NoKey::NoLock));
        assert_eq!(inputs_key("github:me/agents#base"), Err(NoKey::NotLocal));
        assert_eq!(inputs_key("./agents#base"), Err(NoKey::NotLocal));
        std::fs::write(dir.path().join(FLAKE_LOCK_FILE), "{\"version\":7}").unwrap();
        let first = inputs_key(&flake).unwrap();
        assert_eq!(inputs_key(&flake).unwrap(), first, "stable");
        assert_ne!(
            inputs_key(&format!("{}#other", dir.path().display())).unwrap(),
            first,
            "the attribute counts"
        );
        std::fs::write(dir.path().join(FLAKE_LOCK_FILE), "{\"version\":8}").unwrap();
        assert_ne!(inputs_key(&flake).unwrap(), first, "the lock file counts");
    }

    #[test]
    fn nix_files_and_the_files_they_name_count_and_nothing_else() {
        let (dir, flake) = project();
        let root = dir.path();
        let mut key = inputs_key(&flake).unwrap();
        let mut edit = |file: &str, text: &str, changes: bool| {
            write(&root.join(file), text);
            let new = inputs_key(&flake).unwrap();
            if changes {
                assert_ne!(new, key, "editing {file} changes the key");
            } else {
                assert_eq!(new, key, "editing {file} leaves the key");
            }
            key = new;
        };
        edit("README.md", "# the project, edited\n", false);
        edit("src/main.rs", "fn main() { println!() }\n", false);
        edit("notes/todo.txt", "now\n", false);
        edit(
            "hosts/a/default.nix",
            "{ ... }: { imports = [ ../common/base.nix ]; } # x\n",
            true,
        );
        let flake_nix = std::fs::read_to_string(root.join("flake.nix")).unwrap();
        edit("flake.nix", &format!("{flake_nix}# edited\n"), true);
        edit("hosts/common/motd.txt", "hello again\n", true);
        edit("config/tool.json", "{\"a\": 1}\n", true);
        edit("keys/b.pub", "ssh-ed25519 BBBB b\n", true);
        edit("hosts/new/default.nix", "{ }\n", true);
        edit("sub/flake.lock", "{}\n", true);
        // Hidden folders, target and result links are not searched.
        edit(".direnv/x.nix", "{ }\n", false);
        edit("target/debug/y.nix", "{ }\n", false);
        std::os::unix::fs::symlink("/nix/store/x-out", root.join("result")).unwrap();
        assert_eq!(inputs_key(&flake).unwrap(), key, "result link");
        std::fs::remove_file(root.join("hosts/common/motd.txt")).unwrap();
        assert_ne!(inputs_key(&flake).unwrap(), key, "a named file removed");
    }

    #[test]
    fn files_named_outside_the_flake_root_count() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("flake");
        write(&root.join("flake.lock"), "{}");
        write(
            &root.join("flake.nix"),
            "{ x = import ../shared/lib.nix; }\n",
        );
        write(
            &dir.path().join("shared/lib.nix"),
            "builtins.readFile ./data.txt\n",
        );
        write(&dir.path().join("shared/data.txt"), "one\n");
        let flake = format!("{}#x", root.display());
        let key = inputs_key(&flake).unwrap();
        write(&dir.path().join("shared/data.txt"), "two\n");
        assert_ne!(
            inputs_key(&flake).unwrap(),
            key,
            "named by a named .nix file"
        );
    }

    #[test]
    fn too_many_files_means_no_key() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("flake.lock"), "{}");
        write(&dir.path().join("flake.nix"), "{ data = ./data; }\n");
        for i in 0..10 {
            write(&dir.path().join(format!("data/{i}")), "");
        }
        let flake = format!("{}#x", dir.path().display());
        // flake.lock, flake.nix, the data folder and its 10 files.
        assert!(key_within(&flake, 13, 100).is_ok());
        assert_eq!(key_within(&flake, 12, 100), Err(NoKey::TooLarge));
        assert_eq!(key_within(&flake, 13, 5), Err(NoKey::TooLarge));
    }

    #[test]
    fn path_literals_are_found_as_nix_writes_them() {
        let text = "{ pkgs, ... }: {\n  imports = [ ./a.nix ../b/c.nix ];\n  x = ./dir/;\n  y = ./data-${name}.json;\n  z = (./hosts + \"/${name}\");\n  w = ./hosts/${name}/default.nix;\n  src = ./.;\n  url = \"github:o/r\"; v = 1.5; f = a./b;\n}\n";
        assert_eq!(
            path_literals(text),
            [
                "./a.nix",
                "../b/c.nix",
                "./dir",
                ".",
                "./hosts",
                "./hosts",
                "./."
            ]
        );
    }

    #[test]
    fn normalize_resolves_dots_by_name() {
        assert_eq!(
            normalize(Path::new("/p/hosts/a/../common/./base.nix")),
            Path::new("/p/hosts/common/base.nix")
        );
        assert_eq!(normalize(Path::new("/p/./.")), Path::new("/p"));
    }
}
