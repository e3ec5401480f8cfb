//! sops: an SSH host key as an age recipient (the conversion ssh-to-age does),
//! and adding or removing it in the matching creation rule of `.sops.yaml`.

use anyhow::{Context, Result, bail};
use bech32::{Bech32, Hrp};
use curve25519_dalek::edwards::CompressedEdwardsY;

pub const SOPS_YAML: &str = ".sops.yaml";

/// The age recipient (`age1…`) of an `ssh-ed25519` public key: the Montgomery
/// form of its Edwards point, bech32-encoded.
pub fn ssh_to_age(ssh_key: &str) -> Result<String> {
    let key = ssh_key::PublicKey::from_openssh(ssh_key.trim())
        .with_context(|| format!("not an SSH public key: {ssh_key:?}"))?;
    let Some(ed) = key.key_data().ed25519() else {
        bail!(
            "only ssh-ed25519 keys convert to age recipients (got {})",
            key.algorithm()
        );
    };
    let point = CompressedEdwardsY(ed.0)
        .decompress()
        .context("the ed25519 key is not a valid curve point")?;
    let hrp = Hrp::parse("age").expect("\"age\" is a valid bech32 prefix");
    bech32::encode::<Bech32>(hrp, &point.to_montgomery().to_bytes())
        .context("bech32-encoding the recipient")
}

/// One `creation_rules` entry: where it starts and ends in the lines, and its regex.
struct Rule {
    start: usize,
    end: usize,
    path_regex: Option<String>,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn rules(lines: &[&str]) -> Result<Vec<Rule>> {
    let Some(top) = lines.iter().position(|l| l.trim_end() == "creation_rules:") else {
        bail!("{SOPS_YAML} has no creation_rules");
    };
    let mut starts = Vec::new();
    let mut item_indent = None;
    let mut end = lines.len();
    for (i, line) in lines.iter().enumerate().skip(top + 1) {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if indent(line) == 0 && !line.starts_with('-') {
            end = i;
            break;
        }
        if line.trim_start().starts_with("- ") && item_indent.is_none_or(|n| n == indent(line)) {
            item_indent = Some(indent(line));
            starts.push(i);
        }
    }
    Ok(starts
        .iter()
        .enumerate()
        .map(|(n, &start)| {
            let stop = starts.get(n + 1).copied().unwrap_or(end);
            let path_regex = lines[start..stop].iter().find_map(|l| {
                let l = l.trim_start().trim_start_matches("- ");
                l.strip_prefix("path_regex:")
                    .map(|v| v.trim().trim_matches(['\'', '"']).to_string())
            });
            Rule {
                start,
                end: stop,
                path_regex,
            }
        })
        .collect())
}

/// Adds `recipient` (marked with `# marker`) to the `age` keys of the first
/// creation rule whose `path_regex` matches one of `files` (paths relative to
/// the `.sops.yaml` folder). Returns the edited text, or `None` if no rule matches.
pub fn add_recipient(
    text: &str,
    files: &[String],
    recipient: &str,
    marker: &str,
) -> Result<Option<String>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut matched = None;
    for rule in rules(&lines)? {
        let matches = match &rule.path_regex {
            None => true,
            Some(re) => {
                let re = regex::Regex::new(re).with_context(|| format!("path_regex {re:?}"))?;
                files.iter().any(|f| re.is_match(f))
            }
        };
        if matches {
            matched = Some(rule);
            break;
        }
    }
    let Some(rule) = matched else { return Ok(None) };
    if lines[rule.start..rule.end]
        .iter()
        .any(|l| l.contains(recipient))
    {
        return Ok(Some(text.to_string()));
    }
    let Some(age_at) = (rule.start..rule.end).find(|&i| {
        lines[i]
            .trim_start()
            .trim_start_matches("- ")
            .starts_with("age:")
    }) else {
        bail!(
            "the matching creation rule of {SOPS_YAML} has no `age` keys: add {recipient} by hand"
        );
    };
    let age_line = lines[age_at];
    let value = age_line.split_once("age:").map_or("", |(_, v)| v).trim();
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    if value.is_empty() {
        // A list of keys follows: add an item like the last one.
        let items: Vec<usize> = (age_at + 1..rule.end)
            .take_while(|&i| lines[i].trim().is_empty() || indent(lines[i]) > indent(age_line))
            .filter(|&i| lines[i].trim_start().starts_with("- "))
            .collect();
        let Some(&last) = items.last() else {
            bail!(
                "the `age` list of the matching rule in {SOPS_YAML} is empty: add {recipient} by hand"
            );
        };
        let pad = " ".repeat(indent(lines[last]));
        out.insert(last + 1, format!("{pad}- {recipient} # {marker}"));
    } else if value.starts_with(['|', '>', '[', '&', '*']) {
        bail!(
            "the `age` value of the matching rule in {SOPS_YAML} is in a form agentvm does not edit: add {recipient} by hand"
        );
    } else {
        // A comma-separated scalar, maybe quoted.
        let quote = value.chars().next().filter(|c| *c == '"' || *c == '\'');
        let new_value = match quote {
            Some(q) => format!("{},{recipient}{q}", value.trim_end_matches(q)),
            None => format!("{value},{recipient}"),
        };
        let prefix = age_line.split_once("age:").map_or("", |(p, _)| p);
        out[age_at] = format!("{prefix}age: {new_value}");
    }
    let mut edited = out.join("\n");
    if text.ends_with('\n') {
        edited.push('\n');
    }
    Ok(Some(edited))
}

/// Removes `recipient` from every `age` list item or scalar.
pub fn remove_recipient(text: &str, recipient: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        let item = line.trim_start().trim_start_matches("- ");
        if item.starts_with(recipient) && line.trim_start().starts_with("- ") {
            continue;
        }
        out.push(
            line.replace(&format!(",{recipient}"), "")
                .replace(&format!("{recipient},"), ""),
        );
    }
    let mut edited = out.join("\n");
    if text.ends_with('\n') {
        edited.push('\n');
    }
    edited
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_like_ssh_to_age() {
        // ssh-to-age's documented output for this key (pgp2ssh README, "Get age key").
        assert_eq!(
            ssh_to_age("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICYvKXGcG4a19tTT0Rycbn+D0r/YlKltLJ9dY2gR/Fjx openpgp:0x47C9F3FF").unwrap(),
            "age18s8m9hvlrwvltgys4lafyyqe356ntc7e06t4kd2nccqm5amsaa2s878mju"
        );
        assert!(ssh_to_age("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7").is_err());
    }

    const SOPS: &str = "keys:\n  - &admin age1admin\ncreation_rules:\n  # host secrets\n  - path_regex: secrets/drago/[^/]+\\.yaml$\n    key_groups:\n      - age:\n          - *admin\n  - path_regex: secrets/shared\\.yaml$\n    age: 'age1admin,age1other'\n";

    #[test]
    fn adds_a_list_item_to_the_matching_rule() {
        let edited = add_recipient(
            SOPS,
            &["secrets/drago/token.yaml".into()],
            "age1new",
            "agentvm-drago",
        )
        .unwrap()
        .unwrap();
        assert!(edited.contains("          - *admin\n          - age1new # agentvm-drago\n  - path_regex: secrets/shared"), "{edited}");
        assert_eq!(remove_recipient(&edited, "age1new"), SOPS);
    }

    #[test]
    fn appends_to_a_comma_separated_scalar() {
        let edited = add_recipient(
            SOPS,
            &["secrets/shared.yaml".into()],
            "age1new",
            "agentvm-drago",
        )
        .unwrap()
        .unwrap();
        assert!(
            edited.contains("    age: 'age1admin,age1other,age1new'\n"),
            "{edited}"
        );
        assert_eq!(remove_recipient(&edited, "age1new"), SOPS);
    }

    #[test]
    fn no_matching_rule_is_none() {
        assert!(
            add_recipient(SOPS, &["other/x.yaml".into()], "age1new", "m")
                .unwrap()
                .is_none()
        );
    }
}
