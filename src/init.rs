//! `agentvm init`: a commented `agentvm.toml` for this machine, with the
//! accelerator it can use, the user's SSH key and one VM `agentvm up` can run.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The public keys looked for in `~/.ssh`, best first.
pub const SSH_KEY_FILES: [&str; 3] = ["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"];
/// Where `.ci/demo` builds the test guest, when `AGENTVM_TESTGUEST_DIR` does not say.
pub const TESTGUEST_DIR: &str = "/var/tmp/agentvm-testguest";
pub const ENV_TESTGUEST_DIR: &str = "AGENTVM_TESTGUEST_DIR";
/// The files of the test guest `images/testguest/build.sh` writes.
pub const TESTGUEST_FILES: [&str; 3] = ["vmlinuz", "initrd.img", "disk.qcow2"];
/// Where the example image is expected when no image is found here.
pub const CLOUD_IMAGE: &str = "~/images/debian-12-genericcloud-amd64.qcow2";
pub const CLOUD_IMAGE_URL: &str =
    "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2";
/// The example VM's name.
pub const EXAMPLE_VM: &str = "agent";

/// What `init` found out about this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// `Ok` when KVM is usable, else why not.
    pub kvm: Result<(), String>,
    /// The user's SSH public key file, as written into the file (`~/…` when under home).
    pub ssh_key: Option<String>,
    pub image: ExampleImage,
}

/// The image the example VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExampleImage {
    /// The tiny test guest (kernel, initramfs and disk) found in this folder.
    TestGuest(PathBuf),
    /// No image here: a Debian cloud image at [`CLOUD_IMAGE`], to be downloaded.
    Missing,
}

/// Looks at this machine: KVM (as `accel = "auto"` would decide on `uri`),
/// `~/.ssh`, and the test guest.
pub fn detect(uri: &str) -> Facts {
    let kvm = kvm(uri);
    let home = crate::paths::non_empty_env("HOME").map(PathBuf::from);
    let ssh_key = home.as_deref().and_then(|home| {
        SSH_KEY_FILES
            .iter()
            .find(|f| home.join(".ssh").join(f).is_file())
            .map(|f| format!("~/.ssh/{f}"))
    });
    let dir = crate::paths::non_empty_env(ENV_TESTGUEST_DIR)
        .map_or_else(|| PathBuf::from(TESTGUEST_DIR), PathBuf::from);
    let image = if TESTGUEST_FILES.iter().all(|f| dir.join(f).is_file()) {
        ExampleImage::TestGuest(dir)
    } else {
        ExampleImage::Missing
    };
    Facts {
        kvm,
        ssh_key,
        image,
    }
}

/// `Ok` when KVM is usable on `uri`, else why not (as `accel = "auto"` decides).
/// The daemon executable answers (only it loads libvirt).
fn kvm(uri: &str) -> Result<(), String> {
    let daemon = crate::daemon::entry::daemon_exe().map_err(|e| format!("{e:#}"))?;
    let out = std::process::Command::new(&daemon)
        .args(["--kvm-check", "--connect", uri])
        .output()
        .map_err(|e| format!("running {}: {e}", daemon.display()))?;
    let answer: crate::daemon::entry::KvmCheck =
        serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "{} --kvm-check gave no answer ({e}): {}",
                daemon.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
    match answer.unusable {
        None => Ok(()),
        Some(why) => Err(why),
    }
}

/// The text of the fleet file for `facts`.
pub fn generate(facts: &Facts) -> String {
    let mut out = String::from(
        "# agentvm.toml: the agent VMs of this folder, written by `agentvm init`.\n\
         #\n\
         # [defaults] apply to every VM, [images.NAME] say what a VM boots, and each\n\
         # [vms.NAME] is one VM: `agentvm up NAME` creates and starts it, `agentvm ssh NAME`\n\
         # logs in, `agentvm down NAME` stops it and `agentvm destroy NAME` removes it.\n\
         # Without names, up, down and status act on every VM of this file.\n\
         # The README's \"A tour of agentvm.toml\" lists every key.\n\
         \n\
         [defaults]\n",
    );
    match &facts.kvm {
        Ok(()) => out.push_str(
            "# KVM is usable here: guests run at native speed.\n\
             accel = \"kvm\"\n",
        ),
        Err(why) => {
            out.push_str(&comment(&format!(
                "KVM is not usable here ({}), so guests run under TCG (software emulation): \
                 slower, but it works. Once /dev/kvm is usable (on Debian: add yourself to the \
                 kvm group), say \"auto\" or \"kvm\".",
                why.trim()
            )));
            out.push_str("accel = \"tcg\"\n");
        }
    }
    match &facts.ssh_key {
        Some(key) => out.push_str(&format!(
            "# Your public key, for logging in with plain ssh too (agentvm ssh uses its own key).\n\
             ssh_keys = [{}]\n",
            toml_string(key)
        )),
        None => out.push_str(
            "# No SSH public key was found in ~/.ssh (id_ed25519.pub, id_ecdsa.pub, id_rsa.pub).\n\
             # Make one with `ssh-keygen -t ed25519` and add it here to log in with plain ssh\n\
             # too (agentvm ssh works without it, with agentvm's own key):\n\
             # ssh_keys = [\"~/.ssh/id_ed25519.pub\"]\n",
        ),
    }
    match &facts.image {
        ExampleImage::TestGuest(dir) => {
            let file = |name: &str| toml_string(&dir.join(name).display().to_string());
            out.push_str(&format!(
                "\n# The tiny test guest (busybox, dropbear, qemu-guest-agent) that\n\
                 # images/testguest/build.sh built in {}.\n\
                 [images.testguest]\n\
                 kernel = {}\n\
                 initrd = {}\n\
                 file = {}\n\
                 cmdline = \"console=ttyS0 quiet\"\n\
                 \n\
                 # An example VM: `agentvm up {EXAMPLE_VM}`, then `agentvm ssh {EXAMPLE_VM}`.\n\
                 [vms.{EXAMPLE_VM}]\n\
                 image = \"testguest\"\n\
                 cpus = 1\n\
                 memory = \"256MiB\"\n\
                 purpose = \"first VM made by agentvm init\"\n",
                dir.display().to_string().replace('\n', " "),
                file("vmlinuz"),
                file("initrd.img"),
                file("disk.qcow2"),
            ));
        }
        ExampleImage::Missing => {
            out.push_str(&format!(
                "\n# A stock Debian 12 cloud image. It was not found on this machine: get it with\n\
                 #   mkdir -p ~/images\n\
                 #   curl -Lo {CLOUD_IMAGE} \\\n\
                 #     {CLOUD_IMAGE_URL}\n\
                 # (until then `agentvm up` fails naming the missing file).\n\
                 [images.debian]\n\
                 file = {}\n\
                 cloud_init = true   # agentvm gives it a NoCloud seed: user, keys, host name\n\
                 agent = false       # stock cloud images have no qemu-guest-agent\n\
                 \n\
                 # An example VM: `agentvm up {EXAMPLE_VM}`, then `agentvm ssh {EXAMPLE_VM}`.\n\
                 [vms.{EXAMPLE_VM}]\n\
                 image = \"debian\"\n\
                 cpus = 2\n\
                 memory = \"2GiB\"\n\
                 disk = \"10GiB\"\n\
                 purpose = \"first VM made by agentvm init\"\n",
                toml_string(CLOUD_IMAGE),
            ));
        }
    }
    out
}

/// Writes `text` to `path` unless something is there already (checked and
/// created in one step, so an existing file is never touched).
pub fn write_new(path: &Path, text: &str) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => exists_error(path),
            _ => anyhow::Error::new(e).context(format!("creating {}", path.display())),
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// The refusal to overwrite `path`.
pub fn exists_error(path: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} already exists; agentvm init does not overwrite it (edit it, or remove it first)",
        path.display()
    )
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// `text` as `# ` lines of at most about 90 characters.
fn comment(text: &str) -> String {
    let mut out = String::new();
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > 90 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Accel, Fleet, ImageSource};

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDtestkeytestkeytestkeytestkeytestkeytest me@host";

    fn parse(facts: &Facts, dir: &Path) -> Fleet {
        let text = generate(facts);
        Fleet::parse(&dir.join("agentvm.toml"), &text)
            .unwrap_or_else(|e| panic!("{e}\n---\n{text}"))
    }

    fn facts(kvm: bool, ssh_key: Option<String>, image: ExampleImage) -> Facts {
        Facts {
            kvm: if kvm {
                Ok(())
            } else {
                Err("/dev/kvm is missing or not usable by this user".into())
            },
            ssh_key,
            image,
        }
    }

    #[test]
    fn every_variant_parses_with_the_fleet_parser() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id_ed25519.pub");
        std::fs::write(&key, format!("{KEY}\n")).unwrap();
        let guest = ExampleImage::TestGuest(PathBuf::from("/var/tmp/agentvm-testguest"));
        for kvm in [true, false] {
            for ssh_key in [None, Some(key.display().to_string())] {
                for image in [guest.clone(), ExampleImage::Missing] {
                    let f = facts(kvm, ssh_key.clone(), image.clone());
                    let fleet = parse(&f, dir.path());
                    let vm = fleet.vm(EXAMPLE_VM).unwrap();
                    assert_eq!(vm.accel, if kvm { Accel::Kvm } else { Accel::Tcg });
                    assert_eq!(vm.ssh_keys.len(), usize::from(ssh_key.is_some()));
                    if ssh_key.is_some() {
                        assert_eq!(vm.ssh_keys[0], KEY);
                    }
                    let image_spec = fleet.image_of(vm).unwrap();
                    match image {
                        ExampleImage::TestGuest(_) => assert!(matches!(
                            &image_spec.source,
                            ImageSource::Kernel { kernel, .. }
                                if kernel == Path::new("/var/tmp/agentvm-testguest/vmlinuz")
                        )),
                        ExampleImage::Missing => {
                            assert!(image_spec.cloud_init);
                            assert!(!image_spec.agent);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tcg_says_why_and_a_missing_key_says_how_to_add_one() {
        let text = generate(&facts(false, None, ExampleImage::Missing));
        assert!(text.contains("accel = \"tcg\""), "{text}");
        assert!(text.contains("/dev/kvm is missing"), "{text}");
        assert!(
            text.contains("# ssh_keys = [\"~/.ssh/id_ed25519.pub\"]"),
            "{text}"
        );
        assert!(text.contains("ssh-keygen"), "{text}");
        assert!(text.contains(CLOUD_IMAGE_URL), "{text}");
        let kvm = generate(&facts(
            true,
            Some("~/.ssh/id_rsa.pub".into()),
            ExampleImage::Missing,
        ));
        assert!(kvm.contains("accel = \"kvm\""), "{kvm}");
        assert!(kvm.contains("ssh_keys = [\"~/.ssh/id_rsa.pub\"]"), "{kvm}");
    }

    #[test]
    fn an_existing_file_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentvm.toml");
        std::fs::write(&path, "# mine\n").unwrap();
        let err = write_new(&path, "other").unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "# mine\n");
    }
}
