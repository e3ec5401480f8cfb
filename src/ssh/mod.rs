//! agentvm's own SSH identity, the `ssh` command line for a VM, `ssh-config`
//! blocks, and (in `banner`) waiting for a guest's SSH banner.

mod banner;

pub use banner::{read_banner, wait_for_banner, wait_for_banner_at};

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use ssh_key::{Algorithm, LineEnding, PrivateKey};

use crate::fsutil::{create_private_dir, write_atomic};
use crate::paths::Home;

/// agentvm's key pair, made on first use.
#[derive(Debug, Clone)]
pub struct Identity {
    pub private_key: PathBuf,
    pub public_line: String,
}

impl Identity {
    pub fn ensure(home: &Home) -> Result<Self> {
        let private_key = home.ssh_key();
        let public_path = private_key.with_extension("pub");
        if private_key.is_file() && public_path.is_file() {
            let public_line = std::fs::read_to_string(&public_path)
                .with_context(|| format!("reading {}", public_path.display()))?
                .trim()
                .to_string();
            return Ok(Self {
                private_key,
                public_line,
            });
        }
        create_private_dir(&home.ssh_dir())?;
        let key = PrivateKey::random(&mut ssh_key::rand_core::OsRng, Algorithm::Ed25519)
            .context("generating an ed25519 key")?;
        let mut public = key.public_key().clone();
        public.set_comment("agentvm");
        let public_line = public.to_openssh().context("encoding the public key")?;
        let private = key
            .to_openssh(LineEnding::LF)
            .context("encoding the private key")?;
        write_atomic(&private_key, private.as_bytes(), 0o600)?;
        write_atomic(&public_path, format!("{public_line}\n").as_bytes(), 0o644)?;
        Ok(Self {
            private_key,
            public_line,
        })
    }
}

/// How to reach a VM over SSH.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    /// The VM's name (the `Host` alias is `agentvm-<name>`).
    pub vm: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub identity: PathBuf,
    pub known_hosts: PathBuf,
    /// The host key was pinned (`agentvm hostkey`): check it strictly.
    pub strict: bool,
}

impl Endpoint {
    pub fn host_alias(&self) -> String {
        format!("agentvm-{}", self.vm)
    }

    /// Options shared by `ssh` and `ssh-config`. Host keys are pinned per VM under
    /// a stable alias, so a port reused by another VM cannot match a stale key.
    fn options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HostName", self.host.clone()),
            ("Port", self.port.to_string()),
            ("User", self.user.clone()),
            ("IdentityFile", self.identity.display().to_string()),
            ("IdentitiesOnly", "yes".into()),
            ("UserKnownHostsFile", self.known_hosts.display().to_string()),
            (
                "StrictHostKeyChecking",
                if self.strict { "yes" } else { "accept-new" }.into(),
            ),
            ("HostKeyAlias", self.host_alias()),
            ("LogLevel", "ERROR".into()),
        ]
    }

    /// The options as `-o Key=Value` arguments (for `NIX_SSHOPTS` and the like).
    pub fn option_args(&self) -> Vec<String> {
        self.options()
            .into_iter()
            .map(|(key, value)| format!("-o {key}={value}"))
            .collect()
    }

    /// The system `ssh` with this endpoint; `command` runs remotely if given.
    pub fn command(&self, command: &[String]) -> Command {
        let mut cmd = Command::new("ssh");
        for (key, value) in self.options() {
            cmd.arg("-o").arg(format!("{key}={value}"));
        }
        cmd.arg(self.host_alias());
        if !command.is_empty() {
            cmd.arg("--").args(command);
        }
        cmd
    }

    /// `ssh -N` with `extra` options first (ssh keeps the first value it
    /// reads of an option) and then this endpoint's, holding `forwards`
    /// (`-R`/`-L` arguments) open until it is killed or the connection dies.
    pub fn tunnel(&self, extra: &[(&str, &str)], forwards: &[String]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-N");
        for (key, value) in extra {
            cmd.arg("-o").arg(format!("{key}={value}"));
        }
        for (key, value) in self.options() {
            cmd.arg("-o").arg(format!("{key}={value}"));
        }
        cmd.args(forwards).arg(self.host_alias());
        cmd
    }

    /// A `Host` block for `~/.ssh/config` (`Include` the output).
    pub fn config_block(&self) -> String {
        let mut out = format!("Host {}\n", self.host_alias());
        for (key, value) in self.options() {
            let quoted = if value.contains(' ') {
                format!("\"{value}\"")
            } else {
                value
            };
            let _ = writeln!(out, "  {key} {quoted}");
        }
        out
    }
}

/// `type base64` from a public key file or a known_hosts/keyscan line.
pub fn public_key_of(text: &str) -> anyhow::Result<String> {
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = fields
            .iter()
            .position(|f| f.starts_with("ssh-") || f.starts_with("ecdsa-"))
            && let Some(blob) = fields.get(i + 1)
        {
            return Ok(format!("{} {blob}", fields[i]));
        }
    }
    anyhow::bail!("no SSH public key found")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identity_is_made_once_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let first = Identity::ensure(&home).unwrap();
        assert!(first.public_line.starts_with("ssh-ed25519 "));
        let mode = std::fs::metadata(&first.private_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = Identity::ensure(&home).unwrap();
        assert_eq!(first.public_line, second.public_line);
        // The system ssh-keygen agrees the private key is valid and matches.
        let out = Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&first.private_key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let derived = String::from_utf8(out.stdout).unwrap();
        let blob = |l: &str| l.split_whitespace().nth(1).unwrap().to_string();
        assert_eq!(blob(&derived), blob(&first.public_line));
    }

    fn endpoint() -> Endpoint {
        Endpoint {
            vm: "drago".into(),
            host: "127.0.0.1".into(),
            port: 2222,
            user: "root".into(),
            identity: "/h/ssh/id_ed25519".into(),
            known_hosts: "/h/vms/drago/known_hosts".into(),
            strict: false,
        }
    }

    #[test]
    fn command_carries_port_key_user_and_known_hosts() {
        let cmd = endpoint().command(&["uname".into(), "-a".into()]);
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        for want in [
            "Port=2222",
            "User=root",
            "IdentityFile=/h/ssh/id_ed25519",
            "UserKnownHostsFile=/h/vms/drago/known_hosts",
            "HostName=127.0.0.1",
        ] {
            assert!(args.contains(&want.to_string()), "{want} in {args:?}");
        }
        assert_eq!(
            &args[args.len() - 4..],
            ["agentvm-drago", "--", "uname", "-a"]
        );
    }

    #[test]
    fn config_block_is_accepted_by_ssh() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::write(&config, endpoint().config_block()).unwrap();
        let out = Command::new("ssh")
            .arg("-G")
            .arg("-F")
            .arg(&config)
            .arg("agentvm-drago")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let effective = String::from_utf8(out.stdout).unwrap();
        assert!(effective.contains("port 2222"), "{effective}");
        assert!(effective.contains("hostname 127.0.0.1"), "{effective}");
        assert!(effective.contains("user root"), "{effective}");
    }

    #[test]
    fn keys_come_from_pub_files_and_keyscan_lines() {
        assert_eq!(
            public_key_of("ssh-ed25519 AAAA root@host\n").unwrap(),
            "ssh-ed25519 AAAA"
        );
        assert_eq!(
            public_key_of("# 127.0.0.1:2222 SSH-2.0-dropbear\n[127.0.0.1]:2222 ssh-ed25519 BBBB\n")
                .unwrap(),
            "ssh-ed25519 BBBB"
        );
        assert!(public_key_of("garbage").is_err());
    }
}
