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

use crate::fsutil::{
    existing_mode, read_json_state, sync_dir, write_atomic, write_atomic_keep_mode,
};

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
    /// Every secret file it was added for, so removal reaches the files a VM
    /// no longer lists.
    #[serde(default)]
    pub files: Vec<PathBuf>,
}

/// The recipients recorded in `path` (none when the file does not exist); a
/// file that cannot be parsed is an error, and is not written over.
pub fn read_added(path: &Path) -> Result<BTreeMap<String, Added>> {
    read_json_state(path)
}

/// Drops what agentvm recorded of `vm`'s key: a removal is complete.
pub fn forget(vm: &str, added_path: &Path) -> Result<()> {
    let mut added = read_added(added_path)?;
    if added.remove(vm).is_some() {
        write_atomic(added_path, &serde_json::to_vec_pretty(&added)?, 0o600)?;
    }
    Ok(())
}

/// The admin identity file: `given` (`--identity`), else `~/.ssh/id_ed25519`.
pub fn admin_identity(given: Option<PathBuf>) -> Result<PathBuf> {
    match given {
        Some(path) => Ok(path),
        None => Ok(PathBuf::from(
            crate::paths::non_empty_env("HOME").context("HOME is not set: give --identity")?,
        )
        .join(".ssh/id_ed25519")),
    }
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
    // Removal also reaches the files the key was added for that the VM no longer lists.
    let mut secrets: Vec<PathBuf> = secrets.to_vec();
    if let (true, Some(known)) = (remove, added.get(vm)) {
        for file in &known.files {
            if !secrets.contains(file) {
                secrets.push(file.clone());
            }
        }
    }
    let secrets = &secrets[..];
    // Only age files need the admin identity (sops re-encrypts with its own).
    let id = if secrets
        .iter()
        .any(|f| f.extension().is_some_and(|e| e == "age"))
    {
        Some(load_identity(identity)?)
    } else {
        None
    };

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
            // A file that is gone gives no access: nothing to take back.
            if remove && !file.exists() {
                continue;
            }
            match std::fs::read(&file)
                .map_err(anyhow::Error::from)
                .and_then(|c| {
                    let armored = c.starts_with(ARMOR_BEGIN);
                    let id = id.as_deref().context("no admin identity was loaded")?;
                    decrypt(&c, id).map(|p| (p, armored, c))
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
            if let Some(mode) = existing_mode(&file) {
                use std::os::unix::fs::PermissionsExt;
                tmp.as_file()
                    .set_permissions(std::fs::Permissions::from_mode(mode))
                    .with_context(|| format!("keeping the mode of {}", file.display()))?;
            }
            tmp.persist(&file)
                .with_context(|| format!("replacing {}", file.display()))?;
            sync_dir(&dir);
            report.rekeyed.push(file);
        }
        if edited != original {
            write_atomic_keep_mode(&nix, edited.as_bytes(), 0o644)?;
            report.edited.push(nix);
        }
    }

    // sops: the age form of the key in the creation rule each file matches.
    let sops_path = fleet_dir.join(sops::SOPS_YAML);
    let sops_files: Vec<PathBuf> = secrets
        .iter()
        .filter(|f| f.extension().is_none_or(|e| e != "age"))
        .cloned()
        .collect();
    match (&age_recipient, sops_path.is_file()) {
        _ if sops_files.is_empty() => {}
        (_, false) if !remove => {
            for file in &sops_files {
                report.failed.push((
                    file.clone(),
                    format!(
                        "no {} in {} to give it the key",
                        sops::SOPS_YAML,
                        fleet_dir.display()
                    ),
                ));
            }
        }
        (None, _) if !remove => {
            for file in &sops_files {
                report.failed.push((
                    file.clone(),
                    "only an ssh-ed25519 host key has an age form for sops; add the VM's key by hand"
                        .to_string(),
                ));
            }
        }
        (Some(age), true) => {
            let text = std::fs::read_to_string(&sops_path)
                .with_context(|| format!("reading {}", sops_path.display()))?;
            let edited = if remove {
                sops::remove_recipient(&text, &sops_path, age)
            } else {
                // sops takes, for each file, the first rule whose path_regex matches it.
                let mut edited = text.clone();
                let mut failed = None;
                for file in &sops_files {
                    let rel = [relative(file, fleet_dir)];
                    match sops::add_recipient(&edited, &sops_path, &rel, age, &mark) {
                        Ok(Some(next)) => edited = next,
                        Ok(None) => report.failed.push((
                            file.clone(),
                            format!("no creation rule of {} matches it", sops_path.display()),
                        )),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    Some(e) => Err(e),
                    None => Ok(edited),
                }
            };
            match edited {
                Ok(edited) if edited != text => {
                    write_atomic_keep_mode(&sops_path, edited.as_bytes(), 0o644)?;
                    report.edited.push(sops_path);
                    report.sops_files = sops_files;
                }
                // A removal may have edited the rule in an earlier run whose
                // `sops updatekeys` did not happen: they all still need it.
                Ok(_) if remove => report.sops_files = sops_files,
                Ok(_) => {}
                // The agenix files are done: say what to do by hand and go on.
                Err(e) => report.failed.push((sops_path, format!("{e:#}"))),
            }
        }
        _ => {}
    }

    // A removal keeps the record: the caller forgets it (`forget`) once
    // every file, sops re-encryption included, is done.
    if !remove {
        let mut files: Vec<PathBuf> = added.get(vm).map(|a| a.files.clone()).unwrap_or_default();
        for file in secrets {
            if !files.contains(file) {
                files.push(file.clone());
            }
        }
        files.sort();
        added.insert(
            vm.to_string(),
            Added {
                ssh: ssh_recipient,
                age: age_recipient,
                files,
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
                files: vec!["/f/secrets/drago.age".into()],
            },
        )]);
        write_atomic(&path, &serde_json::to_vec_pretty(&added).unwrap(), 0o600).unwrap();
        let read = read_added(&path).unwrap();
        assert_eq!(read["drago"].ssh, added["drago"].ssh);
        assert_eq!(read["drago"].age, added["drago"].age);
    }

    /// An identity file and an ed25519 host key, made here.
    fn keys(dir: &Path) -> (PathBuf, String) {
        let identity = age::x25519::Identity::generate();
        let id_path = dir.join("admin.txt");
        use age::secrecy::ExposeSecret;
        std::fs::write(&id_path, identity.to_string().expose_secret()).unwrap();
        let host = ssh_key::PrivateKey::random(
            &mut ssh_key::rand_core::OsRng,
            ssh_key::Algorithm::Ed25519,
        )
        .unwrap();
        (id_path, host.public_key().to_openssh().unwrap())
    }

    #[test]
    fn each_sops_file_gets_the_key_in_its_own_rule_and_one_without_a_rule_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (identity, host) = keys(dir.path());
        let yaml = "creation_rules:\n  - path_regex: secrets/drago/.*\\.yaml$\n    age: age1qyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqs3290gq\n  - path_regex: secrets/shared\\.yaml$\n    age: age1qyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqs3290gq\n";
        std::fs::write(dir.path().join(".sops.yaml"), yaml).unwrap();
        let files: Vec<PathBuf> = ["secrets/drago/x.yaml", "secrets/shared.yaml"]
            .iter()
            .map(|f| dir.path().join(f))
            .collect();
        let record = dir.path().join("secrets.json");
        let report = rekey("drago", &files, dir.path(), Some(&host), &identity, &record).unwrap();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let age = report.age_recipient.clone().unwrap();
        let edited = std::fs::read_to_string(dir.path().join(".sops.yaml")).unwrap();
        assert_eq!(edited.matches(&age).count(), 2, "both rules: {edited}");
        assert_eq!(read_added(&record).unwrap()["drago"].files, files);

        // A file no rule matches is reported, not passed over.
        let mut more = files.clone();
        more.push(dir.path().join("other/z.yaml"));
        let report = rekey("drago", &more, dir.path(), Some(&host), &identity, &record).unwrap();
        assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
        assert!(
            report.failed[0].1.contains("no creation rule"),
            "{:?}",
            report.failed
        );

        // Removal reaches every rule and names every sops file to re-encrypt,
        // also on a second run; the record goes when the caller says so.
        for _ in 0..2 {
            let report = rekey("drago", &[], dir.path(), None, &identity, &record).unwrap();
            assert!(report.failed.is_empty(), "{:?}", report.failed);
            assert_eq!(report.sops_files.len(), 3, "{:?}", report.sops_files);
            assert_eq!(
                std::fs::read_to_string(dir.path().join(".sops.yaml")).unwrap(),
                yaml
            );
        }
        assert!(read_added(&record).unwrap().contains_key("drago"));
        forget("drago", &record).unwrap();
        assert!(read_added(&record).unwrap().is_empty());
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
