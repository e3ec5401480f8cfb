//! agenix's `secrets.nix`: adding and removing a recipient in the entries of
//! given files, as text edits that leave the rest of the file as written, and
//! reading each entry's recipients by evaluating the file with Nix.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// agenix's recipients file.
pub const SECRETS_NIX: &str = "secrets.nix";

/// Adds the string literal `recipient` to the `publicKeys` of `file`'s entry.
/// Returns the edited text, unchanged if the literal is already there.
pub fn add_recipient(text: &str, file: &str, recipient: &str) -> Result<String> {
    let literal = format!("\"{recipient}\"");
    let (value_start, value_end) = public_keys_value(text, file)?;
    let value = &text[value_start..value_end];
    if value.contains(&literal) {
        return Ok(text.to_string());
    }
    let trimmed = value.trim_end();
    let insertion = if trimmed.ends_with(']') {
        // A list literal ends the value: put the key in before its `]`.
        let close = value_start + trimmed.len() - 1;
        let inside = &text[..close];
        let last_line = inside.rsplit('\n').next().unwrap_or("");
        if last_line.trim().is_empty() && inside.contains('\n') {
            // Multi-line list: a line of its own, indented like the item above it.
            let item_indent = item_indent(&text[value_start..close]).unwrap_or("    ");
            let line_start = close - last_line.len();
            return Ok(format!(
                "{}{item_indent}{literal}\n{}",
                &text[..line_start],
                &text[line_start..]
            ));
        }
        let before = text[..close].trim_end().len();
        (before, format!(" {literal} "))
    } else {
        // An expression (`users`, `a ++ b`): append a list to it.
        (value_start + trimmed.len(), format!(" ++ [ {literal} ]"))
    };
    let (at, insert) = insertion;
    let rest = text[at..].trim_start_matches([' ', '\t']);
    Ok(format!("{}{insert}{rest}", &text[..at]))
}

/// Removes every `"ssh-… marker"` string literal (the key comment marks whose
/// key it is), and any `++ [ ]` left empty by that.
pub fn remove_marked(text: &str, marker: &str) -> String {
    let suffix = format!(" {marker}");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('"') {
        let Some(len) = rest[start + 1..].find('"') else {
            break;
        };
        let end = start + len + 2;
        let body = &rest[start + 1..end - 1];
        if body.starts_with("ssh-") && body.ends_with(&suffix) {
            let before = rest[..start].trim_end_matches([' ', '\t']);
            out.push_str(before);
            rest = &rest[end..];
            // A literal alone on its line takes the line with it.
            if before.ends_with('\n') {
                rest = rest.strip_prefix('\n').unwrap_or(rest);
            }
        } else {
            out.push_str(&rest[..end]);
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out.replace(" ++ [ ]", "")
}

/// The byte range of the value of `"file".publicKeys = …;`.
fn public_keys_value(text: &str, file: &str) -> Result<(usize, usize)> {
    let key = format!("\"{file}\"");
    let mut search = 0;
    while let Some(found) = text[search..].find(&key) {
        let after = search + found + key.len();
        let tail = &text[after..];
        let rest = tail.trim_start();
        if let Some(rest) = rest.strip_prefix(".publicKeys") {
            let rest_trim = rest.trim_start();
            if let Some(value) = rest_trim.strip_prefix('=') {
                let value_start = text.len() - value.len();
                let value_end = value_start + statement_end(value)?;
                return Ok((value_start, value_end));
            }
        }
        search = after;
    }
    bail!("{SECRETS_NIX} has no `\"{file}\".publicKeys = [ … ];` entry")
}

/// Where the expression starting `text` ends: the first `;` outside strings,
/// comments and brackets.
fn statement_end(text: &str) -> Result<usize> {
    let bytes = text.as_bytes();
    let (mut depth, mut i) = (0i32, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < bytes.len() && !(bytes[i] == b'*' && bytes[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'[' | b'(' | b'{' => depth += 1,
            b']' | b')' | b'}' => depth -= 1,
            b';' if depth == 0 => return Ok(i),
            _ => {}
        }
        i += 1;
    }
    bail!("unterminated publicKeys entry in {SECRETS_NIX}")
}

/// The indentation of the last item line in a multi-line list.
fn item_indent(list: &str) -> Option<&str> {
    list.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .last()
        .map(|l| &l[..l.len() - l.trim_start().len()])
}

/// Every entry's recipients, by evaluating `secrets.nix` (pure evaluation, no store).
pub fn recipients(path: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(rename = "publicKeys")]
        public_keys: Vec<String>,
    }
    let out = Command::new("nix-instantiate")
        .args(["--store", "dummy://", "--eval", "--strict", "--json"])
        .arg(path)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!(
                "nix-instantiate is not installed: it reads {SECRETS_NIX} as agenix does"
            ),
            _ => anyhow::Error::new(e).context("running nix-instantiate"),
        })?;
    if !out.status.success() {
        bail!(
            "evaluating {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let entries: BTreeMap<String, Entry> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("reading the evaluation of {}", path.display()))?;
    Ok(entries
        .into_iter()
        .map(|(file, entry)| (file, entry.public_keys))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRETS: &str = r#"# who may read what
let
  admin = "ssh-ed25519 AAAAadmin admin@laptop"; # the admin
  users = [ admin ];
in
{
  # drago's token
  "drago-token.age".publicKeys = [ admin ];
  "shared.age".publicKeys = [
    admin
    "ssh-ed25519 AAAAluce agentvm-luce"
  ];
  "both.age".publicKeys = users; /* from let */
}
"#;

    const KEY: &str = "ssh-ed25519 AAAAdrago agentvm-drago";

    #[test]
    fn adds_to_a_one_line_list_keeping_comments() {
        let edited = add_recipient(SECRETS, "drago-token.age", KEY).unwrap();
        assert!(edited.contains(
            "\"drago-token.age\".publicKeys = [ admin \"ssh-ed25519 AAAAdrago agentvm-drago\" ];"
        ), "{edited}");
        assert_eq!(edited.replace(&format!(" \"{KEY}\""), ""), SECRETS);
    }

    #[test]
    fn adds_a_line_to_a_multi_line_list() {
        let edited = add_recipient(SECRETS, "shared.age", KEY).unwrap();
        assert!(edited.contains(
            "    \"ssh-ed25519 AAAAluce agentvm-luce\"\n    \"ssh-ed25519 AAAAdrago agentvm-drago\"\n  ];"
        ), "{edited}");
    }

    #[test]
    fn appends_to_an_expression() {
        let edited = add_recipient(SECRETS, "both.age", KEY).unwrap();
        assert!(edited.contains(
            "\"both.age\".publicKeys = users ++ [ \"ssh-ed25519 AAAAdrago agentvm-drago\" ]; /* from let */"
        ), "{edited}");
    }

    #[test]
    fn adding_twice_changes_nothing_and_removal_restores_the_file() {
        let mut text = SECRETS.to_string();
        for file in ["drago-token.age", "shared.age", "both.age"] {
            text = add_recipient(&text, file, KEY).unwrap();
            assert_eq!(add_recipient(&text, file, KEY).unwrap(), text);
        }
        assert_eq!(remove_marked(&text, "agentvm-drago"), SECRETS);
        // luce's key stays when drago's goes.
        assert!(remove_marked(&text, "agentvm-drago").contains("agentvm-luce"));
    }

    #[test]
    fn a_missing_entry_is_an_error() {
        let err = add_recipient(SECRETS, "nope.age", KEY).unwrap_err();
        assert!(err.to_string().contains("\"nope.age\".publicKeys"), "{err}");
    }
}
