//! sops: an SSH host key as an age recipient (the conversion ssh-to-age does),
//! and adding or removing it in the matching creation rule of `.sops.yaml`.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use bech32::{Bech32, Hrp};
use curve25519_dalek::edwards::CompressedEdwardsY;

mod check;

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

/// Why agentvm does not edit a file, and what to do by hand instead.
fn by_hand(path: &Path, line: usize, why: &str, todo: &str) -> anyhow::Error {
    anyhow!(
        "{}:{line}: {why}; agentvm left the file as it was. {todo}",
        path.display()
    )
}

/// The 1-based line where `value` (an `&anchor` name) is defined, if anywhere.
fn anchor_line(lines: &[&str], name: &str) -> Option<usize> {
    let anchor = format!("&{name}");
    lines
        .iter()
        .position(|l| {
            l.split_whitespace()
                .any(|w| w.trim_end_matches(':') == anchor)
        })
        .map(|i| i + 1)
}

/// Adds `recipient` (marked with `# marker`) to the `age` keys of the first
/// creation rule whose `path_regex` matches one of `files` (paths relative to
/// the `.sops.yaml` folder) in `text`, read from `path`. Returns the edited
/// text, or `None` if no rule matches. A rule in a form agentvm cannot edit
/// safely is an error that says which lines to add by hand.
pub fn add_recipient(
    text: &str,
    path: &Path,
    files: &[String],
    recipient: &str,
    marker: &str,
) -> Result<Option<String>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut matched = None;
    for (index, rule) in rules(&lines)?.into_iter().enumerate() {
        let matches = match &rule.path_regex {
            None => true,
            Some(re) => {
                let re = regex::Regex::new(re).with_context(|| format!("path_regex {re:?}"))?;
                files.iter().any(|f| re.is_match(f))
            }
        };
        if matches {
            matched = Some((index, rule));
            break;
        }
    }
    let Some((index, rule)) = matched else {
        return Ok(None);
    };
    let rule_line = rule.start + 1;
    let key_of = |l: &str| {
        l.trim_start()
            .trim_start_matches("- ")
            .trim_start()
            .to_string()
    };
    if lines[rule.start..rule.end]
        .iter()
        .any(|l| key_of(l).starts_with(recipient))
        || lines[rule.start..rule.end]
            .iter()
            .any(|l| key_of(l).starts_with("age:") && l.contains(recipient))
    {
        return Ok(Some(text.to_string()));
    }
    let Some(age_at) = (rule.start..rule.end).find(|&i| key_of(lines[i]).starts_with("age:"))
    else {
        let pad = " ".repeat(indent(lines[rule.start]) + 2);
        return Err(by_hand(
            path,
            rule_line,
            "the matching creation rule has no `age` keys",
            &format!("Add to the rule at line {rule_line}:\n{pad}age: {recipient} # {marker}"),
        ));
    };
    let age_line = lines[age_at];
    let key_column = age_line.find("age:").unwrap_or(0);
    let item = format!("{}- {recipient} # {marker}", " ".repeat(key_column + 2));
    let under_age = format!("Add under `age:` at line {}:\n{item}", age_at + 1);
    if let Some(merge) = (rule.start..rule.end).find(|&i| key_of(lines[i]).starts_with("<<:")) {
        return Err(by_hand(
            path,
            rule_line,
            &format!(
                "the matching creation rule merges keys (`<<:` at line {})",
                merge + 1
            ),
            &under_age,
        ));
    }
    let value = age_line.split_once("age:").map_or("", |(_, v)| v).trim();
    let value = match value.find(" #") {
        Some(comment) => value[..comment].trim_end(),
        None if value.starts_with('#') => "",
        None => value,
    };
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    if let Some(alias) = value.strip_prefix('*') {
        let todo = match anchor_line(&lines, alias) {
            Some(n) => format!(
                "Add to the list anchored `&{alias}` at line {n}:\n  - {recipient} # {marker}\n(indented like its items), or under `age:` at line {} in place of the alias.",
                age_at + 1
            ),
            None => under_age.clone(),
        };
        return Err(by_hand(
            path,
            rule_line,
            &format!(
                "the `age` keys of the matching rule are the alias `*{alias}`, shared with whatever else uses it"
            ),
            &todo,
        ));
    } else if value.starts_with('&') {
        return Err(by_hand(
            path,
            rule_line,
            "the `age` keys of the matching rule carry an anchor, so other rules may share them",
            &under_age,
        ));
    } else if value.starts_with(['|', '>', '!']) {
        return Err(by_hand(
            path,
            rule_line,
            "the `age` value of the matching rule is a block scalar or tagged",
            &format!(
                "Append `,{recipient}` to the `age` value at line {}.",
                age_at + 1
            ),
        ));
    } else if value.starts_with(['[', '{']) {
        return Err(by_hand(
            path,
            rule_line,
            "the `age` keys of the matching rule are a flow collection",
            &format!(
                "Add `{recipient}` inside the brackets at line {}, or write them as a list:\n{}age:\n{item}",
                age_at + 1,
                " ".repeat(key_column)
            ),
        ));
    } else if value.is_empty() {
        // A list of keys follows: add an item like the last one.
        let items: Vec<usize> = (age_at + 1..rule.end)
            .take_while(|&i| lines[i].trim().is_empty() || indent(lines[i]) > indent(age_line))
            .filter(|&i| lines[i].trim_start().starts_with("- "))
            .collect();
        let Some(&last) = items.last() else {
            return Err(by_hand(
                path,
                rule_line,
                "the `age` list of the matching rule is empty",
                &under_age,
            ));
        };
        let pad = " ".repeat(indent(lines[last]));
        out.insert(last + 1, format!("{pad}- {recipient} # {marker}"));
    } else {
        // A comma-separated scalar, maybe quoted.
        let quote = value.chars().next().filter(|c| *c == '"' || *c == '\'');
        let new_value = match quote {
            Some(q) => format!("{},{recipient}{q}", value.trim_end_matches(q)),
            None => format!("{value},{recipient}"),
        };
        let (prefix, rest) = age_line.split_once("age:").unwrap_or(("", ""));
        let comment = rest.find(" #").map_or("", |c| &rest[c..]);
        out[age_at] = format!("{prefix}age: {new_value}{comment}");
    }
    let edited = join(text, &out);
    check::added(text, &edited, index, recipient).map_err(|e| {
        by_hand(
            path,
            rule_line,
            &format!("the edit would change more than the rule's `age` keys ({e:#})"),
            &under_age,
        )
    })?;
    Ok(Some(edited))
}

fn join(original: &str, lines: &[String]) -> String {
    let mut joined = lines.join("\n");
    if original.ends_with('\n') {
        joined.push('\n');
    }
    joined
}

/// Removes `recipient` from every `age` list item or scalar of `text`, read
/// from `path`; an edit that would change anything else is an error that
/// lists the lines to remove by hand.
pub fn remove_recipient(text: &str, path: &Path, recipient: &str) -> Result<String> {
    let mut out: Vec<String> = Vec::new();
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let item = line.trim_start().trim_start_matches("- ");
        let is_item = line.trim_start().starts_with("- ")
            && (item == recipient || item.starts_with(&format!("{recipient} ")));
        if is_item {
            found.push(n + 1);
            continue;
        }
        let edited = if item.starts_with("age:") {
            line.replace(&format!(",{recipient}"), "")
                .replace(&format!("{recipient},"), "")
        } else {
            line.to_string()
        };
        if edited != line {
            found.push(n + 1);
        }
        out.push(edited);
    }
    if found.is_empty() {
        return Ok(text.to_string());
    }
    let edited = join(text, &out);
    check::removed(text, &edited, recipient).map_err(|e| {
        let lines: Vec<String> = found.iter().map(|n| n.to_string()).collect();
        by_hand(
            path,
            found[0],
            &format!("removing {recipient} would change more than `age` keys ({e:#})"),
            &format!("Remove it by hand from line(s) {}.", lines.join(", ")),
        )
    })?;
    Ok(edited)
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

    fn yaml() -> &'static Path {
        Path::new("fleet/.sops.yaml")
    }

    #[test]
    fn adds_a_list_item_to_the_matching_rule() {
        let edited = add_recipient(
            SOPS,
            yaml(),
            &["secrets/drago/token.yaml".into()],
            "age1new",
            "agentvm-drago",
        )
        .unwrap()
        .unwrap();
        assert!(edited.contains("          - *admin\n          - age1new # agentvm-drago\n  - path_regex: secrets/shared"), "{edited}");
        assert_eq!(remove_recipient(&edited, yaml(), "age1new").unwrap(), SOPS);
    }

    #[test]
    fn appends_to_a_comma_separated_scalar() {
        let edited = add_recipient(
            SOPS,
            yaml(),
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
        assert_eq!(remove_recipient(&edited, yaml(), "age1new").unwrap(), SOPS);
    }

    #[test]
    fn no_matching_rule_is_none() {
        assert!(
            add_recipient(SOPS, yaml(), &["other/x.yaml".into()], "age1new", "m")
                .unwrap()
                .is_none()
        );
    }

    fn refusal(text: &str) -> String {
        let err = add_recipient(
            text,
            yaml(),
            &["secrets/x.yaml".into()],
            "age1new",
            "agentvm-drago",
        )
        .unwrap_err();
        format!("{err:#}")
    }

    const RULE: &str = "creation_rules:\n  - path_regex: secrets/\n    key_groups:\n      - age:";

    #[test]
    fn refuses_forms_it_cannot_edit_saying_what_to_add() {
        let lists = format!("keys:\n  - &keys\n    - age1admin\n{RULE} *keys\n");
        let err = refusal(&lists);
        assert!(err.starts_with("fleet/.sops.yaml:5: "), "{err}");
        assert!(
            err.contains("alias `*keys`") && err.contains("anchored `&keys` at line 2"),
            "{err}"
        );
        assert!(err.contains("- age1new # agentvm-drago"), "{err}");
        let under_age = "Add under `age:` at line 6:\n          - age1new # agentvm-drago";
        for (value, why) in [
            (" &keys\n          - age1admin", "anchor"),
            (" [age1admin]", "flow collection"),
            (" |\n          age1admin", "block scalar"),
        ] {
            let err = refusal(&format!("\n\n{RULE}{value}\n"));
            assert!(
                err.starts_with("fleet/.sops.yaml:4: ") && err.contains(why),
                "{err}"
            );
            if why == "anchor" {
                assert!(err.ends_with(under_age), "{err}");
            }
        }
        let merged = "base: &base\n  age: age1admin\ncreation_rules:\n  - path_regex: secrets/\n    <<: *base\n    age: age1other\n";
        let err = refusal(merged);
        assert!(
            err.starts_with("fleet/.sops.yaml:4: ") && err.contains("`<<:` at line 5"),
            "{err}"
        );
        assert!(
            err.ends_with("line 6:\n      - age1new # agentvm-drago"),
            "{err}"
        );
    }

    #[test]
    fn appends_after_alias_items() {
        let text = format!("keys:\n  - &admin age1admin\n{RULE}\n          - *admin\n");
        let edited = add_recipient(&text, yaml(), &["secrets/x.yaml".into()], "age1new", "m")
            .unwrap()
            .unwrap();
        assert!(
            edited.ends_with("          - *admin\n          - age1new # m\n"),
            "{edited}"
        );
    }

    #[test]
    fn refuses_an_edit_that_changes_more_than_the_keys() {
        // The rule's key group is shared through an anchor with a second rule.
        let shared = "creation_rules:\n  - path_regex: secrets/\n    key_groups: &groups\n      - age:\n          - age1admin\n  - path_regex: other/\n    key_groups: *groups\n";
        let err = refusal(shared);
        assert!(
            err.starts_with("fleet/.sops.yaml:2: ") && err.contains("change more"),
            "{err}"
        );
        assert!(
            err.ends_with("line 4:\n          - age1new # agentvm-drago"),
            "{err}"
        );
        // Removal that would reach past the rules' keys is refused too.
        let keys = "keys:\n  - age1new\ncreation_rules:\n  - age: age1admin,age1new\n";
        let err = remove_recipient(keys, yaml(), "age1new").unwrap_err();
        assert!(format!("{err:#}").contains("line(s) 2, 4"), "{err:#}");
    }
}
