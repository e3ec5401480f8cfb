//! What the `nixos` and `tailscale` steps of a deploy run: the host folder's
//! generated hardware config, the system the flake would switch to (to tell
//! whether a switch would change anything), and the tailnet enrolment.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::paths::{ENV_NIX, non_empty_env};

/// The file `nixos-generate-config --show-hardware-config` output goes to, in
/// the host's folder.
pub const HARDWARE_CONFIG: &str = "hardware-configuration.nix";
/// Where `tailscale up` reads the auth key: its standard input, which the
/// guest agent fills (no file, no command line).
pub const AUTH_KEY_SOURCE: &str = "file:/proc/self/fd/0";
/// The guest's current system.
pub const CURRENT_SYSTEM: &str = "/run/current-system";

/// The host folder of a local flake attribute (`.#agent-drago` →
/// `hosts/agent-drago` beside the flake), when that folder exists.
pub fn host_folder(fleet_file: &Path, nixos: &str) -> Option<PathBuf> {
    let (source, attr) = nixos.split_once('#')?;
    if !(source.is_empty() || source.starts_with('.') || source.starts_with('/')) {
        return None;
    }
    let dir = crate::spec::fleet_dir(fleet_file)
        .join(source)
        .join("hosts")
        .join(attr);
    dir.is_dir().then_some(dir)
}

/// The guest command that prints the hardware config. Without file systems:
/// agent-base mounts its root by label, and the by-UUID mounts the guest
/// would report would tie the host (and an image built from it) to one disk.
pub fn hardware_config_argv() -> Vec<String> {
    vec![
        "nixos-generate-config".into(),
        "--show-hardware-config".into(),
        "--no-filesystems".into(),
    ]
}

/// The flake attribute `nixos-rebuild` switches to (`FLAKE#attr` →
/// `FLAKE#nixosConfigurations."attr".config.system.build.toplevel`).
pub fn toplevel_attr(flake_ref: &str) -> Result<String> {
    let Some((flake, attr)) = flake_ref.rsplit_once('#') else {
        bail!("{flake_ref:?} names no flake attribute (expected FLAKE#HOST)");
    };
    let attr = attr
        .strip_prefix("nixosConfigurations.")
        .unwrap_or(attr)
        .trim_matches('"');
    Ok(format!(
        "{flake}#nixosConfigurations.\"{attr}\".config.system.build.toplevel"
    ))
}

/// The store path of the system the flake would switch the host to, by
/// evaluating it (nothing is built).
pub fn toplevel(flake_ref: &str) -> Result<String> {
    let nix = non_empty_env(ENV_NIX).unwrap_or_else(|| crate::image::nix_build::NIX.to_string());
    let attr = toplevel_attr(flake_ref)?;
    let out = Command::new(&nix)
        .args([
            "--extra-experimental-features",
            "nix-command flakes",
            "eval",
            "--raw",
            &attr,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!("`{nix}` is not installed (or not on PATH): it evaluates {attr}")
            }
            _ => anyhow::Error::new(e).context("running nix eval"),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        bail!(
            "evaluating {attr}: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let path = String::from_utf8(out.stdout)
        .context("nix eval printed a path that is not UTF-8")?
        .trim()
        .to_string();
    if !path.starts_with('/') {
        bail!("nix eval --raw {attr} printed {path:?}, not a store path");
    }
    Ok(path)
}

/// The guest command that enrols it: tailscale reads the key from its
/// standard input (`file:/proc/self/fd/0`), so it is on no command line.
pub fn tailscale_up_argv(hostname: &str) -> Vec<String> {
    vec![
        "tailscale".into(),
        "up".into(),
        format!("--auth-key={AUTH_KEY_SOURCE}"),
        format!("--hostname={hostname}"),
    ]
}

/// Whether `tailscale status --json` says the node is logged in and running.
pub fn tailscale_running(status_json: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(status_json)
        .ok()
        .and_then(|v| v.get("BackendState")?.as_str().map(|s| s == "Running"))
        .unwrap_or(false)
}

/// Reads the auth key file named in the fleet file: it must exist, be
/// non-empty, and be readable by its owner only.
pub fn read_auth_key(path: &Path, vm: &str) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "vms.{vm}.tailscale.auth_key.file: reading {}",
            path.display()
        )
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "vms.{vm}.tailscale.auth_key.file: {} can be read by others (mode {:o}): chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let key = zeroize::Zeroizing::new(
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    );
    let trimmed = key.trim_ascii();
    if trimmed.is_empty() {
        bail!(
            "vms.{vm}.tailscale.auth_key.file: {} is empty",
            path.display()
        );
    }
    Ok(zeroize::Zeroizing::new(trimmed.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toplevel_attribute_of_a_flake_reference() {
        assert_eq!(
            toplevel_attr("/fleet#agent-drago").unwrap(),
            "/fleet#nixosConfigurations.\"agent-drago\".config.system.build.toplevel"
        );
        assert_eq!(
            toplevel_attr("github:me/fleet#nixosConfigurations.x").unwrap(),
            "github:me/fleet#nixosConfigurations.\"x\".config.system.build.toplevel"
        );
        assert!(toplevel_attr("/fleet").is_err());
    }

    #[test]
    fn host_folder_only_for_existing_local_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = dir.path().join("agentvm.toml");
        std::fs::create_dir_all(dir.path().join("hosts/agent-drago")).unwrap();
        assert_eq!(
            host_folder(&fleet, ".#agent-drago"),
            Some(dir.path().join("hosts/agent-drago"))
        );
        assert_eq!(host_folder(&fleet, ".#agent-luce"), None);
        assert_eq!(host_folder(&fleet, "github:me/x#agent-drago"), None);
    }

    #[test]
    fn tailscale_key_is_a_file_reference_and_status_is_read() {
        let argv = tailscale_up_argv("drago");
        assert!(argv.contains(&"--auth-key=file:/proc/self/fd/0".to_string()));
        assert!(tailscale_running(br#"{"BackendState":"Running"}"#));
        assert!(!tailscale_running(br#"{"BackendState":"NeedsLogin"}"#));
        assert!(!tailscale_running(b"not json"));
    }

    #[test]
    fn an_auth_key_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ts.key");
        std::fs::write(&key, "tskey-auth-123\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_auth_key(&key, "drago").unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            &read_auth_key(&key, "drago").unwrap()[..],
            b"tskey-auth-123"
        );
    }
}
