//! Shared folders of local VMs: a virtiofsd per virtio-fs share started before
//! each start, the shares mounted in the guest through the agent, and their
//! health for `status` and `events`.

use std::time::Duration;

use anyhow::anyhow;

use super::LocalBackend;
use crate::backend::{Result, ShareStatus, Shares, State, exec_captured};
use crate::domain::VmState;
use crate::domain::share::{ShareState, mount_options, share_socket};
use crate::progress::Reporter;
use crate::spec::{Share, ShareKind};
use crate::virtiofsd::{self, ServerFiles};

/// How long mounting the shares in the guest may take.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// Mounts share `$1` (tag) at `$2` as type `$3` with options `$4` unless
/// something is mounted there already, then prints the uid of user `$5`.
const MOUNT_SCRIPT: &str = r#"mkdir -p "$2" || exit 1
if ! mountpoint -q "$2"; then
  if ! grep -qw "$3" /proc/filesystems && ! modprobe "$3" 2>/dev/null; then
    echo "the guest kernel has no $3 file system" >&2; exit 3
  fi
  mount -t "$3" -o "$4" "$1" "$2" || exit 2
fi
id -u "$5" 2>/dev/null || true"#;

impl LocalBackend {
    pub(super) fn share_files(&self, name: &str, index: usize) -> ServerFiles {
        let tag = Share::tag(index);
        let socket = share_socket(&self.runtime_dir, name, &tag);
        let mut pid = socket.clone();
        pid.set_extension(crate::paths::SHARE_PID_SUFFIX.trim_start_matches('.'));
        ServerFiles {
            socket,
            pid,
            log: self.home.vm_share_log(name, &tag),
        }
    }

    /// Starts a virtiofsd for each virtio-fs share of the VM, after checking
    /// every share's host folder; each child is reaped (and its death logged)
    /// by a thread of its own.
    pub(super) fn start_share_servers(&self, state: &VmState) -> Result<()> {
        let name = state.name.as_str();
        for (i, share) in state.shares.iter().enumerate() {
            check_host_folder(name, i, share)?;
        }
        for (i, share) in state.shares.iter().enumerate() {
            if share.kind != ShareKind::Virtiofs {
                continue;
            }
            let files = self.share_files(name, i);
            let length = files.socket.as_os_str().len();
            if length > crate::domain::MAX_SOCKET_PATH {
                return Err(anyhow!(
                    "{name}: the share socket {} is {length} bytes, over the {}-byte limit of a UNIX socket path; use a shorter VM name or XDG_RUNTIME_DIR",
                    files.socket.display(),
                    crate::domain::MAX_SOCKET_PATH
                )
                .into());
            }
            let mut child = virtiofsd::start(share, &files).map_err(|e| {
                self.stop_share_servers(state);
                anyhow!("{name}: shares[{i}] ({}): {e:#}", share.guest)
            })?;
            let (vm, guest, log) = (name.to_string(), share.guest.clone(), files.log.clone());
            std::thread::spawn(move || {
                if let Ok(status) = child.wait() {
                    tracing::info!(
                        "virtiofsd of {vm}'s share {guest} exited ({status}); log: {}",
                        log.display()
                    );
                }
            });
        }
        Ok(())
    }

    /// Stops the VM's virtiofsd processes (after a failed start, or on removal).
    pub(super) fn stop_share_servers(&self, state: &VmState) {
        for i in 0..state.shares.len() {
            virtiofsd::stop(&self.share_files(&state.name, i));
        }
    }

    /// The shares as `status` shows them; a running VM whose virtiofsd is gone
    /// has a problem that names the fix.
    pub(super) fn share_status(&self, state: &VmState, live: State) -> Vec<ShareStatus> {
        state
            .shares
            .iter()
            .enumerate()
            .map(|(i, share)| {
                let files = self.share_files(&state.name, i);
                let server = match share.kind {
                    ShareKind::NineP => None,
                    ShareKind::Virtiofs => Some(virtiofsd::running(&files).is_some()),
                };
                let problem = (live == State::Running && server == Some(false)).then(|| {
                    format!(
                        "the virtiofsd serving {} stopped ({}); guest I/O on {} hangs until the VM restarts: agentvm down --force {name} && agentvm up {name}",
                        share.host.display(),
                        virtiofsd::log_tail(&files.log),
                        share.guest,
                        name = state.name
                    )
                });
                ShareStatus {
                    host: share.host.clone(),
                    guest: share.guest.clone(),
                    kind: share.kind,
                    readonly: share.readonly,
                    tag: Share::tag(i),
                    server_running: server,
                    problem,
                }
            })
            .collect()
    }
}

/// A share's host folder must exist and be a folder when the VM starts.
fn check_host_folder(name: &str, index: usize, share: &ShareState) -> Result<()> {
    let field = format!("vms.{name}.shares[{index}].host");
    match std::fs::metadata(&share.host) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(anyhow!(
            "{field}: {} is not a folder; share a folder (its files appear at {})",
            share.host.display(),
            share.guest
        )
        .into()),
        Err(e) => Err(anyhow!(
            "{field}: {} cannot be shared: {e} (create it, or fix the path in the fleet file)",
            share.host.display()
        )
        .into()),
    }
}

impl Shares for LocalBackend {
    fn mount_shares(&self, name: &str, progress: &dyn Reporter) -> Result<()> {
        let (_, state) = self.require_running(name)?;
        if state.shares.is_empty() {
            return Ok(());
        }
        if !state.agent {
            progress.step(
                name,
                "shares not mounted: the image has no guest agent; they are mounted at boot by systemd ≥ 254 (fstab.extra), or mount them by hand: mount -t virtiofs agentvm0 /PATH",
            );
            return Ok(());
        }
        for (i, share) in state.shares.iter().enumerate() {
            let tag = Share::tag(i);
            let mut options = mount_options(share);
            // mount(8) wants no fstab-only options on its command line.
            options = options
                .split(',')
                .filter(|o| *o != "nofail" && *o != "defaults")
                .collect::<Vec<_>>()
                .join(",");
            if options.is_empty() {
                options = "rw".to_string();
            }
            let argv: Vec<String> = [
                "/bin/sh",
                "-c",
                MOUNT_SCRIPT,
                "sh",
                &tag,
                &share.guest,
                share.kind.as_str(),
                &options,
                &state.user,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let ran = exec_captured(self, name, &argv, MOUNT_TIMEOUT)?;
            let err = ran.stderr_text();
            match ran.outcome.exit_code {
                Some(0) => {}
                Some(3) => {
                    return Err(anyhow!(
                        "{name}: cannot mount {} at {}: {err}; {}",
                        share.host.display(),
                        share.guest,
                        match share.kind {
                            ShareKind::Virtiofs =>
                                "set type = \"9p\" on this share if the kernel has 9p",
                            ShareKind::NineP =>
                                "set type = \"virtiofs\" (the default) on this share",
                        }
                    )
                    .into());
                }
                _ => {
                    return Err(anyhow!(
                        "{name}: mounting {} at {} in the guest failed: {err}",
                        share.host.display(),
                        share.guest
                    )
                    .into());
                }
            }
            progress.step(
                name,
                &format!(
                    "shared {} at {} ({}{})",
                    share.host.display(),
                    share.guest,
                    share.kind,
                    if share.readonly { ", read-only" } else { "" }
                ),
            );
            let uid = String::from_utf8_lossy(&ran.stdout).trim().to_string();
            if let Ok(uid) = uid.parse::<u32>()
                && uid != share.uid
            {
                progress.step(
                    name,
                    &format!(
                        "the guest user {} has uid {uid}, but files in {} belong to uid {}: set uid = {uid} on this share",
                        state.user, share.guest, share.uid
                    ),
                );
            }
        }
        Ok(())
    }

    fn share_problems(&self) -> Result<Vec<(String, String)>> {
        let mut problems = Vec::new();
        for (dom, state) in self.managed_domains()? {
            if state.shares.is_empty() || !dom.is_active().unwrap_or(false) {
                continue;
            }
            for share in self.share_status(&state, State::Running) {
                if let Some(problem) = share.problem {
                    problems.push((state.name.clone(), problem));
                }
            }
        }
        Ok(problems)
    }
}
