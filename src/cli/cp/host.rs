//! The host side of `cp`: walking a tree to send, and writing what comes
//! from the guest under a temporary name that is renamed into place.

use std::fs::{File, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A host tree to copy, its paths relative to its root's folder (so they
/// start with the root's own name).
#[derive(Debug, Default)]
pub struct Tree {
    /// Folders, parents before children, with their permission bits.
    pub dirs: Vec<(PathBuf, u32)>,
    /// Regular files with their permission bits and sizes.
    pub files: Vec<(PathBuf, u32, u64)>,
    /// Symbolic links (copied as links by the SSH path only).
    pub links: Vec<PathBuf>,
}

impl Tree {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, _, size)| size).sum()
    }
}

/// Walks the folder `root`; its entries' paths start with `name`.
pub fn walk(root: &Path, name: &str) -> Result<Tree> {
    let mut tree = Tree::default();
    let meta = std::fs::metadata(root).with_context(|| format!("reading {}", root.display()))?;
    tree.dirs
        .push((PathBuf::from(name), meta.permissions().mode() & 0o7777));
    walk_into(root, Path::new(name), &mut tree)?;
    Ok(tree)
}

fn walk_into(dir: &Path, rel: &Path, tree: &mut Tree) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let rel = rel.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            tree.dirs.push((rel.clone(), mode));
            walk_into(&path, &rel, tree)?;
        } else if meta.is_file() {
            tree.files.push((rel, mode, meta.len()));
        } else if meta.file_type().is_symlink() {
            tree.links.push(rel);
        }
    }
    Ok(())
}

/// The folder a host path is in (`.` for a bare name).
pub fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes `target` from what `fill` writes to a temporary file beside it,
/// with permission bits `mode`: a failed copy leaves nothing under `target`.
pub fn write_file(
    target: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<()>,
) -> Result<()> {
    let mut temp = tempfile::Builder::new()
        .prefix(".agentvm-cp-")
        .tempfile_in(parent_of(target))
        .with_context(|| format!("making a temporary file beside {}", target.display()))?;
    fill(temp.as_file_mut())?;
    temp.as_file()
        .set_permissions(Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", target.display()))?;
    temp.persist(target)
        .with_context(|| format!("renaming the copy to {}", target.display()))?;
    Ok(())
}

/// Moves the tree `from` to `to`: renamed when `to` does not exist, merged
/// into it (files replaced) when it is a folder.
pub fn install_tree(from: &Path, to: &Path) -> Result<()> {
    match std::fs::symlink_metadata(to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::rename(from, to)
            .with_context(|| format!("renaming the copy to {}", to.display())),
        Err(e) => Err(e).with_context(|| format!("reading {}", to.display())),
        Ok(meta) if meta.is_dir() && from.is_dir() => {
            for entry in
                std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?
            {
                let entry = entry?;
                install_tree(&entry.path(), &to.join(entry.file_name()))?;
            }
            let mode = std::fs::metadata(from)?.permissions().mode();
            std::fs::set_permissions(to, Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", to.display()))?;
            Ok(())
        }
        Ok(meta) if meta.is_dir() => bail!("{} is a folder: not replaced by a file", to.display()),
        Ok(_) if from.is_dir() => bail!("{} exists and is not a folder", to.display()),
        Ok(_) => std::fs::rename(from, to)
            .with_context(|| format!("renaming the copy to {}", to.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_fill_leaves_nothing_and_a_good_one_has_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        let err = write_file(&target, 0o600, |f| {
            use std::io::Write;
            f.write_all(b"half")?;
            bail!("cut off")
        })
        .unwrap_err();
        assert!(err.to_string().contains("cut off"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_file(&target, 0o750, |f| {
            use std::io::Write;
            Ok(f.write_all(b"whole")?)
        })
        .unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o750);
    }

    #[test]
    fn trees_are_walked_and_merged_into_existing_folders() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::write(src.join("a/b/run"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(src.join("a/b/run"), Permissions::from_mode(0o755)).unwrap();
        std::fs::write(src.join("top"), b"x").unwrap();
        let tree = walk(&src, "src").unwrap();
        let dirs: Vec<_> = tree.dirs.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(
            dirs,
            [PathBuf::from("src"), "src/a".into(), "src/a/b".into()]
        );
        assert_eq!(tree.files[0], ("src/a/b/run".into(), 0o755, 10));
        assert_eq!((&tree.files[1].0, tree.files[1].2), (&"src/top".into(), 1));
        assert_eq!(tree.bytes(), 11);

        let to = dir.path().join("to");
        std::fs::create_dir_all(to.join("a")).unwrap();
        std::fs::write(to.join("keep"), b"k").unwrap();
        install_tree(&src, &to).unwrap();
        assert_eq!(std::fs::read(to.join("a/b/run")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(std::fs::read(to.join("keep")).unwrap(), b"k");
        assert!(!src.join("top").exists());
    }
}
