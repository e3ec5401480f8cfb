//! `agentvm provision NAME`: `nixos-rebuild switch` of the VM's `nixos` flake
//! attribute onto the VM, over its forwarded SSH port.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::paths::{ENV_NIXOS_REBUILD, non_empty_env};
use crate::ssh::Endpoint;

pub const NIXOS_REBUILD: &str = "nixos-rebuild";

/// The command that provisions `vm` with `nixos` (`.#agent-drago`, made absolute
/// against the fleet file's folder when it is a path flake).
pub fn command(
    fleet_file: &Path,
    vm: &str,
    nixos: Option<&str>,
    endpoint: &Endpoint,
) -> Result<Command> {
    let Some(nixos) = nixos else {
        bail!(
            "{}: vms.{vm} has no `nixos` flake attribute to provision",
            fleet_file.display()
        );
    };
    let flake = flake_ref(fleet_file, nixos);
    let program = non_empty_env(ENV_NIXOS_REBUILD).unwrap_or_else(|| NIXOS_REBUILD.to_string());
    let mut cmd = Command::new(program);
    cmd.args(["switch", "--flake", &flake, "--target-host"])
        .arg(format!("{}@{}", endpoint.user, endpoint.host_alias()))
        // nixos-rebuild reaches the target with `ssh $NIX_SSHOPTS`.
        .env("NIX_SSHOPTS", endpoint.option_args().join(" "));
    if endpoint.user != "root" {
        cmd.arg("--use-remote-sudo");
    }
    Ok(cmd)
}

/// `nixos` with a path flake (`.#agent-drago`, `./x#y`) made absolute against
/// the fleet file's folder; other flake references stay as written.
pub fn flake_ref(fleet_file: &Path, nixos: &str) -> String {
    match nixos.split_once('#') {
        Some((source, attr)) if source.is_empty() || source.starts_with('.') => {
            let dir = crate::spec::fleet_dir(fleet_file).join(source);
            let dir = dir.canonicalize().unwrap_or(dir);
            format!("{}#{attr}", dir.display())
        }
        _ => nixos.to_string(),
    }
}

/// The command as a shell line, for `--dry-run`.
pub fn shell_line(cmd: &Command) -> String {
    let quote = |s: &str| {
        if s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@#+,".contains(c))
        {
            s.to_string()
        } else {
            format!("'{}'", s.replace('\'', "'\\''"))
        }
    };
    let envs = cmd.get_envs().filter_map(|(k, v)| {
        v.map(|v| format!("{}={}", k.to_string_lossy(), quote(&v.to_string_lossy())))
    });
    let argv = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| quote(&a.to_string_lossy()));
    envs.chain(argv).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(user: &str) -> Endpoint {
        Endpoint {
            vm: "drago".into(),
            host: "127.0.0.1".into(),
            port: 2300,
            user: user.into(),
            identity: "/h/ssh/id_ed25519".into(),
            known_hosts: "/h/vms/drago/known_hosts".into(),
            strict: true,
        }
    }

    #[test]
    fn switches_the_flake_attribute_onto_the_forwarded_port() {
        let cmd = command(
            Path::new("/fleet/agentvm.toml"),
            "drago",
            Some(".#agent-drago"),
            &endpoint("root"),
        )
        .unwrap();
        let line = shell_line(&cmd);
        assert!(
            line.contains(
                "nixos-rebuild switch --flake /fleet/.#agent-drago --target-host root@agentvm-drago"
            ),
            "{line}"
        );
        assert!(line.contains("-o Port=2300"), "{line}");
        assert!(line.contains("-o HostName=127.0.0.1"), "{line}");
        assert!(line.contains("-o StrictHostKeyChecking=yes"), "{line}");
        assert!(!line.contains("--use-remote-sudo"));
        let agent = shell_line(
            &command(
                Path::new("/f/agentvm.toml"),
                "drago",
                Some("github:me/a#x"),
                &endpoint("agent"),
            )
            .unwrap(),
        );
        assert!(
            agent.contains(
                "--flake github:me/a#x --target-host agent@agentvm-drago --use-remote-sudo"
            ),
            "{agent}"
        );
    }

    #[test]
    fn a_vm_without_nixos_is_an_error() {
        let err = command(
            Path::new("/f/agentvm.toml"),
            "drago",
            None,
            &endpoint("root"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no `nixos`"), "{err}");
    }
}
