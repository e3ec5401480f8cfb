//! Whether an age file is already encrypted to a list of recipients, read
//! from its header: `age-encryption.org/v1`, one `-> TYPE ARGS…` stanza per
//! recipient (each followed by base64 body lines), then the `--- MAC` line.
//! An SSH stanza names its key by a tag: the first 4 bytes of SHA-256 of the
//! key's wire encoding, base64 without padding; X25519 stanzas carry only an
//! ephemeral share, so those are counted.

use std::io::Read;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use sha2::Digest;

const VERSION_LINE: &str = "age-encryption.org/v1";

/// The `(type, first argument)` of each stanza in `ciphertext`'s header,
/// armored or not, leaving out grease stanzas.
fn stanzas(ciphertext: &[u8]) -> Result<Vec<(String, String)>> {
    let mut data = Vec::new();
    age::armor::ArmoredReader::new(ciphertext)
        .read_to_end(&mut data)
        .context("reading the age file")?;
    let mut lines = data.split(|b| *b == b'\n');
    if lines.next() != Some(VERSION_LINE.as_bytes()) {
        bail!("not an age v1 file");
    }
    let mut stanzas = Vec::new();
    for line in lines {
        if line.starts_with(b"--- ") {
            return Ok(stanzas);
        }
        if let Some(stanza) = line.strip_prefix(b"-> ") {
            let stanza = std::str::from_utf8(stanza).context("a stanza line is not text")?;
            let mut words = stanza.split(' ');
            let kind = words.next().unwrap_or_default();
            if !kind.ends_with("-grease") {
                let arg = words.next().unwrap_or_default();
                stanzas.push((kind.to_string(), arg.to_string()));
            }
        }
    }
    bail!("the age header has no MAC line")
}

/// The stanza an SSH public key (`type base64 [comment]`) gets: its type and tag.
fn ssh_stanza(recipient: &str) -> Result<(String, String)> {
    let key = ssh_key::PublicKey::from_openssh(recipient.trim())
        .map_err(|e| anyhow!("not an SSH public key: {recipient:?}: {e}"))?;
    let wire = key
        .to_bytes()
        .map_err(|e| anyhow!("encoding {recipient:?}: {e}"))?;
    let digest = sha2::Sha256::digest(&wire);
    let tag = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&digest[..4]);
    Ok((key.algorithm().as_str().to_string(), tag))
}

/// Whether `ciphertext` is encrypted to exactly `recipients` (SSH keys and
/// `age1…` recipients): no more, no fewer.
pub fn encrypted_to(ciphertext: &[u8], recipients: &[String]) -> Result<bool> {
    let mut found = stanzas(ciphertext)?;
    let x25519 = found.iter().filter(|(kind, _)| kind == "X25519").count();
    found.retain(|(kind, _)| kind != "X25519");
    let mut ages = 0;
    let mut wanted = Vec::new();
    for recipient in recipients {
        if recipient.starts_with("age1") {
            ages += 1;
        } else {
            wanted.push(ssh_stanza(recipient)?);
        }
    }
    found.sort();
    wanted.sort();
    Ok(x25519 == ages && found == wanted)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::str::FromStr;

    use super::*;

    const HOST: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICYvKXGcG4a19tTT0Rycbn+D0r/YlKltLJ9dY2gR/Fjx agentvm-drago";

    fn encrypt(recipients: &[String], armored: bool) -> Vec<u8> {
        let parsed: Vec<Box<dyn age::Recipient + Send>> = recipients
            .iter()
            .map(|r| -> Box<dyn age::Recipient + Send> {
                match r.strip_prefix("age1") {
                    Some(_) => Box::new(age::x25519::Recipient::from_str(r).unwrap()),
                    None => Box::new(age::ssh::Recipient::from_str(r).unwrap()),
                }
            })
            .collect();
        let encryptor =
            age::Encryptor::with_recipients(parsed.iter().map(|r| r.as_ref() as _)).unwrap();
        let format = if armored {
            age::armor::Format::AsciiArmor
        } else {
            age::armor::Format::Binary
        };
        let mut out = Vec::new();
        let armor = age::armor::ArmoredWriter::wrap_output(&mut out, format).unwrap();
        let mut writer = encryptor.wrap_output(armor).unwrap();
        writer.write_all(b"secret").unwrap();
        writer.finish().unwrap().finish().unwrap();
        out
    }

    #[test]
    fn says_whether_the_recipients_changed() {
        let admin = age::x25519::Identity::generate().to_public().to_string();
        let other = age::x25519::Identity::generate().to_public().to_string();
        let only_admin = vec![admin.clone()];
        for armored in [false, true] {
            let file = encrypt(&only_admin, armored);
            assert!(encrypted_to(&file, &only_admin).unwrap());
            let with_host = [admin.clone(), HOST.to_string()];
            assert!(
                !encrypted_to(&file, &with_host).unwrap(),
                "a recipient added"
            );
            let file = encrypt(&with_host, armored);
            assert!(encrypted_to(&file, &with_host).unwrap());
            assert!(!encrypted_to(&file, &only_admin).unwrap(), "one removed");
            assert!(
                !encrypted_to(&file, &[admin.clone(), other.clone()]).unwrap(),
                "an SSH key replaced by an age one"
            );
        }
        assert!(encrypted_to(b"not age", &[admin]).is_err());
    }

    #[test]
    fn matches_the_tag_age_writes() {
        // `age -R` with this key writes `-> ssh-ed25519 X6UOjA …` (age 1.1.1).
        assert_eq!(
            ssh_stanza(HOST).unwrap(),
            ("ssh-ed25519".to_string(), "X6UOjA".to_string())
        );
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDMtn+y+udmSLopTynu+qhGseo0UDeOb726B8eXu/eOw66ovHbQuzep51AlHZuQmb4ZfrQgMyCTNK937/KiYcPCs9rY3+vO4RUy+RtBsngtvr6yTp6qsmayhE1TJD4GiXu2uEiN+6h8RYxpNc0FoilOTMXNrw/soUJir+Xp8vlj4AgHL0OzJ7cmKN8WSt5WXvzqIRHjWIjpvdiXYIf96dIUNd41aEWkhCL3HCHtImaiOIlbVfB7ysDo/E2STSQdaJG5YK5R6XfSYrKjAqTHa3NCIc8QDb7vuL6a8G7w6m8al5zXl5NSgdY9JRaJuFjT+aMZ6wxo/nGYJmlRQnORwb2Z";
        assert_eq!(
            ssh_stanza(rsa).unwrap(),
            ("ssh-rsa".to_string(), "cWMpBQ".to_string())
        );
    }
}
