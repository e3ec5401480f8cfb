//! Shared folders: `shares = [{ host = "~/src/site", guest = "/work" }]` makes a
//! host folder appear in the guest, over virtio-fs (or 9p, for guests without it).

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The guest user id that owns a share's files when none is given: the first
/// regular user on Debian, Ubuntu, Fedora and NixOS.
pub const DEFAULT_SHARE_UID: u32 = 1000;

/// How the folder reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ShareKind {
    /// virtio-fs, served by a virtiofsd agentvm runs for the share.
    #[default]
    #[serde(rename = "virtiofs")]
    Virtiofs,
    /// 9p (virtio-9p), served by QEMU itself; for guests without virtio-fs.
    #[serde(rename = "9p")]
    NineP,
}

impl ShareKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Virtiofs => "virtiofs",
            Self::NineP => "9p",
        }
    }
}

impl fmt::Display for ShareKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One shared folder, resolved: `host` is absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub host: PathBuf,
    pub guest: String,
    pub readonly: bool,
    #[serde(rename = "type")]
    pub kind: ShareKind,
    /// The guest user and group that own the files (the host user's files
    /// appear as theirs, and theirs are the host user's on the host).
    pub uid: u32,
    pub gid: u32,
}

impl Share {
    /// The mount tag the guest mounts the `index`th share by.
    pub fn tag(index: usize) -> String {
        format!("agentvm{index}")
    }
}

/// Checks a share's guest path: absolute, without `.`/`..` parts, whitespace or
/// control characters (it becomes an fstab field), and not `/` itself. Returns
/// it without a trailing slash.
pub fn guest_path(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!(
            "{path:?} is not an absolute path: write where in the guest the folder appears, such as \"/work\""
        ));
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{path:?} has whitespace or a control character; use a plain path such as \"/work\""
        ));
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err("\"/\" cannot be shared over: name a folder such as \"/work\"".to_string());
    }
    if trimmed.split('/').any(|part| part == "." || part == "..") {
        return Err(format!(
            "{path:?} has a \".\" or \"..\" part; write the path plainly"
        ));
    }
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths() {
        assert_eq!(guest_path("/work/").unwrap(), "/work");
        assert_eq!(guest_path("/home/agent/src").unwrap(), "/home/agent/src");
        assert!(
            guest_path("work")
                .unwrap_err()
                .contains("not an absolute path")
        );
        assert!(
            guest_path("/")
                .unwrap_err()
                .contains("cannot be shared over")
        );
        assert!(guest_path("/a/../b").unwrap_err().contains("\"..\""));
        assert!(guest_path("/my work").unwrap_err().contains("whitespace"));
    }

    #[test]
    fn kinds_read_as_written() {
        #[derive(Deserialize)]
        struct T {
            kind: ShareKind,
        }
        let t: T = toml::from_str("kind = \"9p\"").unwrap();
        assert_eq!(t.kind, ShareKind::NineP);
        let t: T = toml::from_str("kind = \"virtiofs\"").unwrap();
        assert_eq!(t.kind, ShareKind::Virtiofs);
        assert!(toml::from_str::<T>("kind = \"nfs\"").is_err());
        assert_eq!(Share::tag(3), "agentvm3");
    }
}
