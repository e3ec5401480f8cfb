//! Checks a line edit of `.sops.yaml` against the parsed documents: the only
//! change in meaning may be one recipient added to, or removed from, the `age`
//! keys of the creation rules. Aliases are resolved by the parser, so an edit
//! that reaches another rule through an anchor shows up as a difference.

use anyhow::{Context, Result, bail};
use yaml_rust2::{Yaml, YamlLoader};

/// The single document in `text`, with every creation rule's `age` keys as a
/// list (a comma-separated scalar split into its keys).
fn load(text: &str) -> Result<Yaml> {
    let mut docs = YamlLoader::load_from_str(text).context("parsing it as YAML")?;
    if docs.len() != 1 {
        bail!("{} YAML documents, not one", docs.len());
    }
    let mut doc = docs.remove(0);
    if let Yaml::Array(rules) = &mut doc["creation_rules"] {
        for rule in rules {
            for_each_age(rule, &mut |age| {
                if let Yaml::String(keys) = age {
                    *age = Yaml::Array(
                        keys.split(',')
                            .map(|k| Yaml::String(k.trim().to_string()))
                            .collect(),
                    );
                }
                true
            });
        }
    }
    Ok(doc)
}

/// Calls `f` on every `age` value under `node`, in document order, while it
/// returns true. Returns false once `f` has.
fn for_each_age(node: &mut Yaml, f: &mut dyn FnMut(&mut Yaml) -> bool) -> bool {
    match node {
        Yaml::Hash(map) => {
            for (key, value) in map.iter_mut() {
                let go_on = if key.as_str() == Some("age") {
                    f(value)
                } else {
                    for_each_age(value, f)
                };
                if !go_on {
                    return false;
                }
            }
            true
        }
        Yaml::Array(items) => items.iter_mut().all(|item| for_each_age(item, f)),
        _ => true,
    }
}

fn compare(expected: &Yaml, edited: &str) -> Result<()> {
    let edited = load(edited).context("the edited file")?;
    if *expected != edited {
        bail!("the parsed files differ elsewhere");
    }
    Ok(())
}

/// `edited` means `original` with `recipient` appended to the first `age`
/// keys of creation rule `rule` (counted from 0).
pub(super) fn added(original: &str, edited: &str, rule: usize, recipient: &str) -> Result<()> {
    let mut expected = load(original)?;
    let target = &mut expected["creation_rules"][rule];
    let mut done = false;
    for_each_age(target, &mut |age| {
        if let Yaml::Array(keys) = age {
            keys.push(Yaml::String(recipient.to_string()));
            done = true;
        }
        false
    });
    if !done {
        bail!("creation rule {} has no `age` keys", rule + 1);
    }
    compare(&expected, edited)
}

/// `edited` means `original` without `recipient` in any creation rule's `age` keys.
pub(super) fn removed(original: &str, edited: &str, recipient: &str) -> Result<()> {
    let mut expected = load(original)?;
    if let Yaml::Array(rules) = &mut expected["creation_rules"] {
        for rule in rules {
            for_each_age(rule, &mut |age| {
                if let Yaml::Array(keys) = age {
                    keys.retain(|k| k.as_str() != Some(recipient));
                }
                true
            });
        }
    }
    compare(&expected, edited)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = "keys:\n  - &admin age1admin\ncreation_rules:\n  - path_regex: a\n    key_groups:\n      - age:\n          - *admin\n  - path_regex: b\n    age: age1admin,age1other\n";

    #[test]
    fn accepts_only_the_recipient_in_that_rule() {
        let added_to_a = RULES.replace("- *admin\n", "- *admin\n          - age1new\n");
        assert!(added(RULES, &added_to_a, 0, "age1new").is_ok());
        assert!(
            added(RULES, &added_to_a, 1, "age1new").is_err(),
            "wrong rule"
        );
        assert!(removed(&added_to_a, RULES, "age1new").is_ok());
        let added_to_b = RULES.replace("age1other\n", "age1other,age1new\n");
        assert!(added(RULES, &added_to_b, 1, "age1new").is_ok());
        assert!(removed(&added_to_b, RULES, "age1new").is_ok());
        // Anything else changing is refused.
        let more = added_to_a.replace("path_regex: b", "path_regex: c");
        assert!(added(RULES, &more, 0, "age1new").is_err());
        let keys = RULES.replace("&admin age1admin", "&admin age1new");
        assert!(removed(RULES, &keys, "age1admin").is_err());
        assert!(added(RULES, "creation_rules: [", 0, "age1new").is_err());
    }
}
