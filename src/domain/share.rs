//! Shared folders in the domain: `<filesystem>` devices, the shared memory
//! virtio-fs needs, and the metadata that remembers each share.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::{Share, ShareKind};

/// The virtqueue size libvirt gives a virtio-fs device.
pub const VIRTIOFS_QUEUE: u32 = 1024;

/// One share as the domain metadata holds it (`<agentvm:share …/>`); its mount
/// tag is [`Share::tag`] of its position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareState {
    #[serde(rename = "@host")]
    pub host: PathBuf,
    #[serde(rename = "@guest")]
    pub guest: String,
    #[serde(rename = "@type")]
    pub kind: ShareKind,
    #[serde(rename = "@readonly", default)]
    pub readonly: bool,
    #[serde(rename = "@uid")]
    pub uid: u32,
    #[serde(rename = "@gid")]
    pub gid: u32,
}

impl From<&Share> for ShareState {
    fn from(s: &Share) -> Self {
        Self {
            host: s.host.clone(),
            guest: s.guest.clone(),
            kind: s.kind,
            readonly: s.readonly,
            uid: s.uid,
            gid: s.gid,
        }
    }
}

/// `<runtime dir>/<vm>.<tag>.sock`: where a share's virtiofsd listens.
pub fn share_socket(runtime_dir: &Path, vm: &str, tag: &str) -> PathBuf {
    runtime_dir.join(format!("{vm}.{tag}{}", crate::paths::SHARE_SOCKET_SUFFIX))
}

/// `<memoryBacking>`: vhost-user devices (virtio-fs) need guest memory that
/// another process can map.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryBacking {
    pub source: super::xml::TypeOnly,
    pub access: Access,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Access {
    #[serde(rename = "@mode")]
    pub mode: String,
}

impl MemoryBacking {
    pub fn shared_memfd() -> Self {
        Self {
            source: super::xml::TypeOnly {
                kind: "memfd".into(),
            },
            access: Access {
                mode: "shared".into(),
            },
        }
    }
}

/// `<filesystem type='mount'>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Filesystem {
    #[serde(rename = "@type")]
    pub kind: String,
    #[serde(rename = "@accessmode", skip_serializing_if = "Option::is_none")]
    pub accessmode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<FsDriver>,
    pub source: FsSource,
    pub target: FsTarget,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readonly: Option<super::xml::Empty>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FsDriver {
    #[serde(rename = "@type")]
    pub kind: String,
    #[serde(rename = "@queue")]
    pub queue: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FsSource {
    #[serde(rename = "@socket", skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    #[serde(rename = "@dir", skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FsTarget {
    #[serde(rename = "@dir")]
    pub dir: String,
}

/// The `<filesystem>` of the `index`th share. virtio-fs names the socket of
/// the virtiofsd agentvm runs (libvirt 9 refuses `<source dir>` for it in
/// session mode, and ignores `<readonly/>` on a socket: virtiofsd enforces
/// it); 9p is served by QEMU from the folder, as the user.
pub fn filesystem(share: &ShareState, index: usize, socket: &Path) -> Filesystem {
    let tag = Share::tag(index);
    match share.kind {
        ShareKind::Virtiofs => Filesystem {
            kind: "mount".into(),
            accessmode: None,
            driver: Some(FsDriver {
                kind: "virtiofs".into(),
                queue: VIRTIOFS_QUEUE,
            }),
            source: FsSource {
                socket: Some(socket.to_string_lossy().into_owned()),
                dir: None,
            },
            target: FsTarget { dir: tag },
            readonly: None,
        },
        ShareKind::NineP => Filesystem {
            kind: "mount".into(),
            accessmode: Some("passthrough".into()),
            driver: None,
            source: FsSource {
                socket: None,
                dir: Some(share.host.to_string_lossy().into_owned()),
            },
            target: FsTarget { dir: tag },
            readonly: share.readonly.then_some(super::xml::Empty {}),
        },
    }
}

/// The guest's mount options for a share.
pub fn mount_options(share: &ShareState) -> String {
    let mut options = match share.kind {
        ShareKind::Virtiofs => vec!["defaults"],
        ShareKind::NineP => vec!["trans=virtio", "version=9p2000.L", "msize=524288"],
    };
    if share.readonly {
        options.push("ro");
    }
    options.push("nofail");
    options.join(",")
}

/// The shares as `fstab` lines, for the `fstab.extra` credential that
/// systemd ≥ 254 mounts at boot.
pub fn fstab(shares: &[ShareState]) -> String {
    shares
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "{} {} {} {} 0 0\n",
                Share::tag(i),
                s.guest,
                s.kind.as_str(),
                mount_options(s)
            )
        })
        .collect()
}
