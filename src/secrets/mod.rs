//! `agentvm secrets rekey`: give a VM's SSH host key access to its secrets
//! (agenix `secrets.nix` and `.sops.yaml`), or take it away again.

pub mod agenix;
mod header;
pub mod sops;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::fsutil::{read_json_state, write_atomic};

/// How agentvm marks the keys it adds: the key comment `agentvm-NAME`.
pub fn marker(vm: &str) -> String {
    format!("agentvm-{vm}")
}

/// What was done to each file.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The recipient added or removed (`ssh-ed25519 … agentvm-NAME`).
    pub recipient: String,
    pub age_recipient: Option<String>,
    pub rekeyed: Vec<PathBuf>,
    /// Files already encrypted to exactly their recipients, left as they were.
    pub unchanged: Vec<PathBuf>,
    /// Files left as they were, with why.
    pub failed: Vec<(PathBuf, String)>,
    pub edited: Vec<PathBuf>,
    /// sops files whose rule changed: `sops updatekeys FILE` re-encrypts them.
    pub sops_files: Vec<PathBuf>,
}

/// The recipients agentvm added per VM, so `--remove` works after the VM is gone.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Added {
    pub ssh: String,
    pub age: Option<String>,
}

/// The recipients recorded in `path` (none when the file does not exist); a
/// file that cannot be parsed is an error, and is not written over.
pub fn read_added(path: &Path) -> Result<BTreeMap<String, Added>> {
    read_json_state(path)
}

/// An admin identity: an unencrypted OpenSSH private key or an age identity file.
pub fn load_identity(path: &Path) -> Result<Box<dyn age::Identity>> {
    let text =
        std::fs::read(path).with_context(|| format!("reading identity {}", path.display()))?;
    if text.starts_with(b"AGE-SECRET-KEY-") || text.starts_with(b"# created") {
        let key = String::from_utf8_lossy(&text)
            .lines()
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
            .context("no AGE-SECRET-KEY line")?
            .to_string();
        let identity = age::x25519::Identity::from_str(&key).map_err(|e| anyhow!("{e}"))?;
        return Ok(Box::new(identity));
    }
    match age::ssh::Identity::from_buffer(&text[..], Some(path.display().to_string()))
        .with_context(|| format!("reading identity {}", path.display()))?
    {
        age::ssh::Identity::Unencrypted(key) => Ok(Box::new(age::ssh::Identity::Unencrypted(key))),
        age::ssh::Identity::Encrypted(_) => bail!(
            "{} is passphrase-protected; give an unencrypted identity with --identity",
            path.display()
        ),
        age::ssh::Identity::Unsupported(k) => bail!("{}: unsupported key ({k:?})", path.display()),
    }
}

fn parse_recipient(text: &str) -> Result<Box<dyn age::Recipient + Send>> {
    if text.starts_with("age1") {
        return Ok(Box::new(
            age::x25519::Recipient::from_str(text).map_err(|e| anyhow!("{text}: {e}"))?,
        ));
    }
    Ok(Box::new(
        age::ssh::Recipient::from_str(text).map_err(|e| anyhow!("{text}: {e:?}"))?,
    ))
}

const ARMOR_BEGIN: &[u8] = b"-----BEGIN AGE ENCRYPTED FILE-----";

/// Decrypts an age file in memory.
fn decrypt(ciphertext: &[u8], identity: &dyn age::Identity) -> Result<Zeroizing<Vec<u8>>> {
    let reader = age::armor::ArmoredReader::new(ciphertext);
    let decryptor = age::Decryptor::new(reader).map_err(|e| anyhow!("not an age file: {e}"))?;
    let mut stream = decryptor
        .decrypt(std::iter::once(identity))
        .map_err(|e| anyhow!("cannot decrypt it with the admin identity: {e}"))?;
    let mut plain = Zeroizing::new(Vec::new());
    stream.read_to_end(&mut plain)?;
    Ok(plain)
}

/// Encrypts `plain` to `recipients` into a temp file beside `dest`, armored like the original.
fn encrypt_beside(
    dest: &Path,
    plain: &[u8],
    recipients: &[String],
    armored: bool,
) -> Result<tempfile::NamedTempFile> {
    let parsed = recipients
        .iter()
        .map(|r| parse_recipient(r))
        .collect::<Result<Vec<_>>>()?;
    let encryptor = age::Encryptor::with_recipients(parsed.iter().map(|r| r.as_ref() as _))
        .map_err(|e| anyhow!("{e}"))?;
    let dir = dest.parent().context("secret file folder")?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    let format = if armored {
        age::armor::Format::AsciiArmor
    } else {
        age::armor::Format::Binary
    };
    let armor = age::armor::ArmoredWriter::wrap_output(tmp.as_file_mut(), format)?;
    let mut writer = encryptor.wrap_output(armor)?;
    writer.write_all(plain)?;
    writer.finish()?.finish()?;
    tmp.as_file().sync_all()?;
    Ok(tmp)
}

/// The nearest `secrets.nix` at or above the file's folder.
fn secrets_nix_for(file: &Path) -> Option<PathBuf> {
    file.ancestors()
        .skip(1)
        .map(|d| d.join(agenix::SECRETS_NIX))
        .find(|p| p.is_file())
}

fn relative(file: &Path, dir: &Path) -> String {
    file.strip_prefix(dir)
        .unwrap_or(file)
        .to_string_lossy()
        .into_owned()
}

/// Adds the VM's host key (`host_key`, `type base64`) as a recipient of its
/// secrets and re-encrypts its age files with `identity`; with `remove`, takes
/// the key agentvm added for the VM away again. `added_path` records added keys.
pub fn rekey(
    vm: &str,
    secrets: &[PathBuf],
    fleet_dir: &Path,
    host_key: Option<&str>,
    identity: &Path,
    added_path: &Path,
) -> Result<Report> {
    let mark = marker(vm);
    let mut added = read_added(added_path)?;
    let remove = host_key.is_none();
    let (ssh_recipient, age_recipient) = match host_key {
        Some(key) => {
            let ssh = format!("{} {mark}", key.trim());
            let age = sops::ssh_to_age(key).ok();
            (ssh, age)
        }
        None => {
            let known = added
                .get(vm)
                .cloned()
                .ok_or_else(|| anyhow!("agentvm has not added a key for {vm} to any secrets"))?;
            (known.ssh, known.age)
        }
    };
    let mut report = Report {
        recipient: ssh_recipient.clone(),
        age_recipient: age_recipient.clone(),
        ..Report::default()
    };
    let id = load_identity(identity)?;

    // agenix: every .age file, grouped by the secrets.nix that governs it.
    let mut groups: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    for file in secrets
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "age"))
    {
        match secrets_nix_for(file) {
            Some(nix) => groups.entry(nix).or_default().push(file.clone()),
            None => report.failed.push((
                file.clone(),
                format!("no {} in its folder or above", agenix::SECRETS_NIX),
            )),
        }
    }
    for (nix, files) in groups {
        let dir = nix.parent().context("secrets.nix folder")?.to_path_buf();
        let original =
            std::fs::read_to_string(&nix).with_context(|| format!("reading {}", nix.display()))?;
        // Decrypt first: a file that fails keeps its entry and its content.
        let mut plain = Vec::new();
        for file in files {
            match std::fs::read(&file)
                .map_err(anyhow::Error::from)
                .and_then(|c| {
                    let armored = c.starts_with(ARMOR_BEGIN);
                    decrypt(&c, id.as_ref()).map(|p| (p, armored, c))
                }) {
                Ok((p, armored, c)) => plain.push((file, p, armored, c)),
                Err(e) => report.failed.push((file, format!("{e:#}"))),
            }
        }
        let mut edited = original.clone();
        if remove {
            edited = agenix::remove_marked(&edited, &nix, &mark)?;
        } else {
            for (file, ..) in &plain {
                edited =
                    agenix::add_recipient(&edited, &nix, &relative(file, &dir), &ssh_recipient)?;
            }
        }
        // Evaluate the edited file where it will live, so its imports resolve.
        let probe = tempfile::Builder::new()
            .prefix(".tmp-")
            .suffix(".nix")
            .tempfile_in(&dir)?;
        std::fs::write(probe.path(), &edited)?;
        let recipients = agenix::recipients(probe.path())?;
        drop(probe);
        let mut ready = Vec::new();
        for (file, p, armored, ciphertext) in plain {
            let rel = relative(&file, &dir);
            let result = recipients
                .get(&rel)
                .ok_or_else(|| anyhow!("{} has no entry for {rel}", nix.display()))
                .and_then(|r| {
                    if header::encrypted_to(&ciphertext, r)? {
                        return Ok(None);
                    }
                    encrypt_beside(&file, &p, r, armored).map(Some)
                });
            match result {
                Ok(Some(tmp)) => ready.push((file, tmp)),
                Ok(None) => report.unchanged.push(file),
                Err(e) => report.failed.push((file, format!("{e:#}"))),
            }
        }
        for (file, tmp) in ready {
            tmp.persist(&file)
                .with_context(|| format!("replacing {}", file.display()))?;
            report.rekeyed.push(file);
        }
        if edited != original {
            write_atomic(&nix, edited.as_bytes(), 0o644)?;
            report.edited.push(nix);
        }
    }

    // sops: the age form of the key in the creation rule that matches.
    let sops_path = fleet_dir.join(sops::SOPS_YAML);
    let sops_files: Vec<PathBuf> = secrets
        .iter()
        .filter(|f| f.extension().is_none_or(|e| e != "age"))
        .cloned()
        .collect();
    if let (Some(age), true) = (&age_recipient, sops_path.is_file()) {
        let text = std::fs::read_to_string(&sops_path)
            .with_context(|| format!("reading {}", sops_path.display()))?;
        let rel: Vec<String> = secrets.iter().map(|f| relative(f, fleet_dir)).collect();
        let edited = if remove {
            sops::remove_recipient(&text, &sops_path, age).map(Some)
        } else {
            sops::add_recipient(&text, &sops_path, &rel, age, &mark)
        };
        match edited {
            Ok(Some(edited)) if edited != text => {
                write_atomic(&sops_path, edited.as_bytes(), 0o644)?;
                report.edited.push(sops_path);
                report.sops_files = sops_files;
            }
            Ok(_) => {}
            // The agenix files are done: say what to do by hand and go on.
            Err(e) => report.failed.push((sops_path, format!("{e:#}"))),
        }
    }

    if remove {
        added.remove(vm);
    } else {
        added.insert(
            vm.to_string(),
            Added {
                ssh: ssh_recipient,
                age: age_recipient,
            },
        );
    }
    let record = serde_json::to_vec_pretty(&added)?;
    if std::fs::read(added_path).ok().as_deref() != Some(&record[..]) {
        write_atomic(added_path, &record, 0o600)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_recipients_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.json");
        assert!(read_added(&path).unwrap().is_empty(), "no file, no record");
        let added = BTreeMap::from([(
            "drago".to_string(),
            Added {
                ssh: "ssh-ed25519 AAAA agentvm-drago".into(),
                age: Some("age1xyz".into()),
            },
        )]);
        write_atomic(&path, &serde_json::to_vec_pretty(&added).unwrap(), 0o600).unwrap();
        let read = read_added(&path).unwrap();
        assert_eq!(read["drago"].ssh, added["drago"].ssh);
        assert_eq!(read["drago"].age, added["drago"].age);
    }

    #[test]
    fn a_corrupt_record_is_an_error_and_rekey_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.json");
        let corrupt = b"{\"drago\": {\"ssh\": \"ssh-ed25519 AAAA agentvm-drago\"".to_vec();
        std::fs::write(&path, &corrupt).unwrap();
        for host_key in [Some("ssh-ed25519 AAAA"), None] {
            let err = rekey(
                "drago",
                &[],
                dir.path(),
                host_key,
                &dir.path().join("no-identity"),
                &path,
            )
            .unwrap_err();
            let text = format!("{err:#}");
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.contains("line 1 column"), "{text}");
            assert_eq!(std::fs::read(&path).unwrap(), corrupt);
        }
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["secrets.json"], "no temp file left either");
    }
}
