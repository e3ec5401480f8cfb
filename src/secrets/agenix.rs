//! agenix's `secrets.nix`: adding and removing a recipient in the entries of
//! given files, as text splices at the nodes of the parsed file (rnix's
//! lossless syntax tree) that leave the rest of the file as written, and
//! reading each entry's recipients by evaluating the file with Nix.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use rnix::ast::{self, HasEntry, InterpolPart};
use rnix::{SyntaxKind, SyntaxNode, TextRange};
use rowan::ast::AstNode;

/// agenix's recipients file.
pub const SECRETS_NIX: &str = "secrets.nix";

/// One file's `publicKeys` value in the parsed `secrets.nix`.
struct Entry {
    file: String,
    value: ast::Expr,
}

/// The parsed file and where its errors point.
struct Parsed<'a> {
    text: &'a str,
    path: &'a Path,
    entries: Vec<Entry>,
}

impl<'a> Parsed<'a> {
    /// Parses `text` (read from `path`): the top-level expression, through any
    /// `let … in`, must be an attribute set whose entries are
    /// `"file".publicKeys = …;` or `"file" = { publicKeys = …; };`.
    fn new(text: &'a str, path: &'a Path) -> Result<Self> {
        let parse = rnix::Root::parse(text);
        if let Some(err) = parse.errors().first() {
            let at = match err {
                rnix::ParseError::Unexpected(r)
                | rnix::ParseError::UnexpectedExtra(r)
                | rnix::ParseError::UnexpectedWanted(_, r, _)
                | rnix::ParseError::UnexpectedDoubleBind(r)
                | rnix::ParseError::DuplicatedArgs(r, _) => usize::from(r.start()),
                _ => text.len(),
            };
            bail!("{}:{}: {err}", path.display(), line_at(text, at));
        }
        let mut parsed = Parsed {
            text,
            path,
            entries: Vec::new(),
        };
        let mut expr = parse.tree().expr();
        let set = loop {
            match expr {
                Some(ast::Expr::LetIn(let_in)) => expr = let_in.body(),
                Some(ast::Expr::Paren(paren)) => expr = paren.expr(),
                Some(ast::Expr::AttrSet(set)) if set.rec_token().is_none() => break set,
                Some(other) => {
                    return Err(parsed.error(
                        other.syntax(),
                        "the file is not an attribute set of `\"file.age\".publicKeys = [ … ];` entries",
                    ));
                }
                None => bail!("{}: the file has no expression", path.display()),
            }
        };
        for entry in set.entries() {
            parsed.entry(entry)?;
        }
        Ok(parsed)
    }

    fn error(&self, node: &SyntaxNode, what: &str) -> anyhow::Error {
        let line = line_at(self.text, usize::from(node.text_range().start()));
        anyhow::anyhow!(
            "{}:{line}: {what}; agentvm edits only `\"file.age\".publicKeys = …;` and \
             `\"file.age\" = {{ publicKeys = …; }};` entries, so it left the file as it was",
            self.path.display()
        )
    }

    /// Records `entry`'s `publicKeys` value, or says why it cannot be edited.
    fn entry(&mut self, entry: ast::Entry) -> Result<()> {
        let ast::Entry::AttrpathValue(binding) = entry else {
            return Err(self.error(entry.syntax(), "an `inherit` among the entries"));
        };
        let attrs: Vec<ast::Attr> = binding
            .attrpath()
            .map(|p| p.attrs().collect())
            .unwrap_or_default();
        let names: Vec<Option<String>> = attrs.iter().map(attr_name).collect();
        let unexpected = |what: &str| self.error(binding.syntax(), what);
        let (Some(Some(file)), Some(value)) = (names.first(), binding.value()) else {
            return Err(unexpected("an entry whose name is not a plain string"));
        };
        match &names[1..] {
            [Some(attr)] if attr == "publicKeys" => {}
            // `"file.age".armor = true;` and the like: not a recipient list.
            [Some(_)] => return Ok(()),
            [] => {
                let ast::Expr::AttrSet(inner) = &value else {
                    return Err(unexpected(
                        "an entry that is neither `.publicKeys = …` nor `= { publicKeys = …; }`",
                    ));
                };
                if inner.rec_token().is_some() || inner.inherits().next().is_some() {
                    return Err(unexpected("an entry set with `rec` or `inherit`"));
                }
                let keys = inner.attrpath_values().find(|b| {
                    b.attrpath()
                        .map(|p| p.attrs().map(|a| attr_name(&a)).collect::<Vec<_>>())
                        .is_some_and(|n| n == [Some("publicKeys".to_string())])
                });
                let Some(value) = keys.and_then(|b| b.value()) else {
                    return Err(unexpected("an entry set without `publicKeys = …;`"));
                };
                self.entries.push(Entry {
                    file: file.clone(),
                    value,
                });
                return Ok(());
            }
            _ => {
                return Err(unexpected(
                    "an entry with a longer or computed attribute path",
                ));
            }
        }
        self.entries.push(Entry {
            file: file.clone(),
            value,
        });
        Ok(())
    }

    fn value(&self, file: &str) -> Result<&ast::Expr> {
        self.entries
            .iter()
            .find(|e| e.file == file)
            .map(|e| &e.value)
            .with_context(|| {
                format!(
                    "{} has no `\"{file}\".publicKeys = [ … ];` entry",
                    self.path.display()
                )
            })
    }
}

/// The 1-based line of byte `offset`.
fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// An attribute's name when it is a plain identifier or a string without `${…}`.
fn attr_name(attr: &ast::Attr) -> Option<String> {
    match attr {
        ast::Attr::Ident(ident) => ident.ident_token().map(|t| t.text().to_string()),
        ast::Attr::Str(s) => plain_string(s),
        ast::Attr::Dynamic(_) => None,
    }
}

/// A string literal's value when it has no `${…}`.
fn plain_string(s: &ast::Str) -> Option<String> {
    let mut value = String::new();
    for part in s.normalized_parts() {
        match part {
            InterpolPart::Literal(text) => value.push_str(&text),
            InterpolPart::Interpolation(_) => return None,
        }
    }
    Some(value)
}

/// The string literals inside `node`, with their values.
fn strings(node: &SyntaxNode) -> impl Iterator<Item = (ast::Str, String)> {
    node.descendants()
        .filter_map(ast::Str::cast)
        .filter_map(|s| plain_string(&s).map(|v| (s, v)))
}

fn range(r: TextRange) -> Range<usize> {
    usize::from(r.start())..usize::from(r.end())
}

/// `value` as a Nix string literal.
fn nix_string(value: &str) -> String {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace("${", "\\${");
    format!("\"{escaped}\"")
}

/// Replaces `at` in `text` with `with`.
fn splice(text: &str, at: Range<usize>, with: &str) -> String {
    format!("{}{with}{}", &text[..at.start], &text[at.end..])
}

/// Adds the string literal `recipient` to the `publicKeys` of `file`'s entry
/// in `text`, read from `path` (named in errors). Returns the edited text,
/// unchanged if the literal is already there.
pub fn add_recipient(text: &str, path: &Path, file: &str, recipient: &str) -> Result<String> {
    let parsed = Parsed::new(text, path)?;
    let value = parsed.value(file)?;
    if strings(value.syntax()).any(|(_, v)| v == recipient) {
        return Ok(text.to_string());
    }
    let literal = nix_string(recipient);
    // The list the value ends with: `[ … ]`, or the last one of `… ++ [ … ]`.
    let mut last = value.clone();
    while let ast::Expr::BinOp(op) = &last {
        match (op.operator(), op.rhs()) {
            (Some(ast::BinOpKind::Concat), Some(rhs)) => last = rhs,
            _ => break,
        }
    }
    let list = match last {
        ast::Expr::List(list) => list,
        // An expression that binds tighter than `++`: append a list to it.
        ast::Expr::Ident(_)
        | ast::Expr::Select(_)
        | ast::Expr::Apply(_)
        | ast::Expr::Paren(_)
        | ast::Expr::BinOp(_) => {
            let end = range(value.syntax().text_range()).end;
            return Ok(splice(text, end..end, &format!(" ++ [ {literal} ]")));
        }
        other => {
            return Err(parsed.error(
                other.syntax(),
                "a `publicKeys` value agentvm cannot append a list to",
            ));
        }
    };
    let Some(close) = list.r_brack_token() else {
        return Err(parsed.error(list.syntax(), "a list without its `]`"));
    };
    let close = usize::from(close.text_range().start());
    let open = range(list.syntax().text_range()).start;
    let line_start = text[..close].rfind('\n').map_or(0, |i| i + 1);
    if line_start > open && text[line_start..close].trim().is_empty() {
        // Multi-line list: a line of its own, indented like the item above it.
        let indent = item_indent(&text[open..close]).unwrap_or("    ");
        return Ok(splice(
            text,
            line_start..line_start,
            &format!("{indent}{literal}\n"),
        ));
    }
    let before = text[..close].trim_end().len();
    Ok(splice(text, before..close, &format!(" {literal} ")))
}

/// Removes every `"ssh-… marker"` string literal (the key comment marks whose
/// key it is) from the `publicKeys` lists of `text`, read from `path`, and any
/// `++ [ ]` left empty by that. The rest of the file stays as it is.
pub fn remove_marked(text: &str, path: &Path, marker: &str) -> Result<String> {
    let parsed = Parsed::new(text, path)?;
    let suffix = format!(" {marker}");
    let is_marked = |item: &ast::Expr| match item {
        ast::Expr::Str(s) => {
            plain_string(s).is_some_and(|v| v.starts_with("ssh-") && v.ends_with(&suffix))
        }
        _ => false,
    };
    let mut cuts: Vec<Range<usize>> = Vec::new();
    for entry in &parsed.entries {
        for list in entry
            .value
            .syntax()
            .descendants()
            .filter_map(ast::List::cast)
        {
            let items: Vec<ast::Expr> = list.items().collect();
            let marked: Vec<&ast::Expr> = items.iter().filter(|i| is_marked(i)).collect();
            if marked.is_empty() {
                continue;
            }
            if marked.len() == items.len()
                && let Some(lhs_end) = emptied_concat(&list)
            {
                cuts.push(lhs_end..range(list.syntax().text_range()).end);
                continue;
            }
            cuts.extend(marked.iter().map(|item| item_cut(text, item.syntax())));
        }
    }
    cuts.sort_by_key(|c| std::cmp::Reverse(c.start));
    let mut edited = text.to_string();
    for cut in cuts {
        edited.replace_range(cut, "");
    }
    Ok(edited)
}

/// Where the left side ends when `list` is the right side of `… ++ list`
/// and holds no comments: removing from there to its end removes ` ++ [ … ]`.
fn emptied_concat(list: &ast::List) -> Option<usize> {
    let has_comment = list
        .syntax()
        .descendants_with_tokens()
        .any(|t| t.kind() == SyntaxKind::TOKEN_COMMENT);
    let op = list.syntax().parent().and_then(ast::BinOp::cast)?;
    let is_rhs = op.rhs().is_some_and(|r| r.syntax() == list.syntax());
    (!has_comment && is_rhs && op.operator() == Some(ast::BinOpKind::Concat))
        .then(|| op.lhs().map(|l| range(l.syntax().text_range()).end))
        .flatten()
}

/// What removing the list item `item` removes: its line when it is alone on
/// it; the item and the blanks after it when it starts its line; else the
/// item and the blanks before it.
fn item_cut(text: &str, item: &SyntaxNode) -> Range<usize> {
    let r = range(item.text_range());
    let line_start = text[..r.start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[r.end..].find('\n').map(|i| r.end + i);
    let starts_line = text[line_start..r.start].trim().is_empty();
    match line_end {
        Some(end) if starts_line && text[r.end..end].trim().is_empty() => line_start..end + 1,
        _ if starts_line => {
            r.start..text.len() - text[r.end..].trim_start_matches([' ', '\t']).len()
        }
        _ => text[..r.start].trim_end_matches([' ', '\t']).len()..r.end,
    }
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

    fn nix() -> &'static Path {
        Path::new("fleet/secrets.nix")
    }

    #[test]
    fn adds_to_a_one_line_list_keeping_comments() {
        let edited = add_recipient(SECRETS, nix(), "drago-token.age", KEY).unwrap();
        assert!(edited.contains(
            "\"drago-token.age\".publicKeys = [ admin \"ssh-ed25519 AAAAdrago agentvm-drago\" ];"
        ), "{edited}");
        assert_eq!(edited.replace(&format!(" \"{KEY}\""), ""), SECRETS);
    }

    #[test]
    fn adds_a_line_to_a_multi_line_list() {
        let edited = add_recipient(SECRETS, nix(), "shared.age", KEY).unwrap();
        assert!(edited.contains(
            "    \"ssh-ed25519 AAAAluce agentvm-luce\"\n    \"ssh-ed25519 AAAAdrago agentvm-drago\"\n  ];"
        ), "{edited}");
    }

    #[test]
    fn appends_to_an_expression() {
        let edited = add_recipient(SECRETS, nix(), "both.age", KEY).unwrap();
        assert!(edited.contains(
            "\"both.age\".publicKeys = users ++ [ \"ssh-ed25519 AAAAdrago agentvm-drago\" ]; /* from let */"
        ), "{edited}");
    }

    #[test]
    fn adding_twice_changes_nothing_and_removal_restores_the_file() {
        let mut text = SECRETS.to_string();
        for file in ["drago-token.age", "shared.age", "both.age"] {
            text = add_recipient(&text, nix(), file, KEY).unwrap();
            assert_eq!(add_recipient(&text, nix(), file, KEY).unwrap(), text);
        }
        assert_eq!(
            remove_marked(&text, nix(), "agentvm-drago").unwrap(),
            SECRETS
        );
        // luce's key stays when drago's goes.
        assert!(
            remove_marked(&text, nix(), "agentvm-drago")
                .unwrap()
                .contains("agentvm-luce")
        );
    }

    #[test]
    fn a_missing_entry_is_an_error() {
        let err = add_recipient(SECRETS, nix(), "nope.age", KEY).unwrap_err();
        assert!(err.to_string().contains("\"nope.age\".publicKeys"), "{err}");
    }

    #[test]
    fn edits_the_nested_form() {
        let text = "{\n  \"a.age\" = {\n    publicKeys = [ \"ssh-ed25519 AAAAadmin\" ]; # admin\n    armor = true;\n  };\n}\n";
        let edited = add_recipient(text, nix(), "a.age", KEY).unwrap();
        assert!(
            edited.contains("publicKeys = [ \"ssh-ed25519 AAAAadmin\" \"ssh-ed25519 AAAAdrago agentvm-drago\" ]; # admin\n"),
            "{edited}"
        );
        assert_eq!(
            remove_marked(&edited, nix(), "agentvm-drago").unwrap(),
            text
        );
    }

    #[test]
    fn removes_only_from_public_keys_lists() {
        let text = format!(
            "let\n  drago = \"{KEY}\";\nin {{\n  \"a.age\".publicKeys = [ drago \"{KEY}\" ];\n  \"b.age\".publicKeys = [\n    drago\n    \"{KEY}\" # drago\n  ];\n}}\n"
        );
        let removed = remove_marked(&text, nix(), "agentvm-drago").unwrap();
        assert_eq!(
            removed,
            format!(
                "let\n  drago = \"{KEY}\";\nin {{\n  \"a.age\".publicKeys = [ drago ];\n  \"b.age\".publicKeys = [\n    drago\n    # drago\n  ];\n}}\n"
            )
        );
    }

    #[test]
    fn a_file_agentvm_cannot_edit_is_an_error_naming_the_line() {
        for (text, line) in [
            (
                "{\n  \"a.age\".publicKeys = [ ];\n  \"x.age\" = import ./x.nix;\n}\n",
                3,
            ),
            ("let keys = [ ]; in\n\nimport ./secrets-list.nix\n", 3),
            ("{\n  \"a.age\".publicKeys = [ ;\n}\n", 2),
            ("{\n  inherit (import ./x.nix) y;\n}\n", 2),
            ("{\n  \"a.age\" = { inherit publicKeys; };\n}\n", 2),
            ("{\n  \"${x}.age\".publicKeys = [ ];\n}\n", 2),
            (
                "{\n  \"a.age\".publicKeys =\n    if true then [ ] else [ ];\n}\n",
                3,
            ),
        ] {
            let err = add_recipient(text, nix(), "a.age", KEY).unwrap_err();
            let shown = format!("{err:#}");
            assert!(
                shown.starts_with(&format!("fleet/secrets.nix:{line}: ")),
                "{text}\n{shown}"
            );
            if line != 3 || !text.contains("if true") {
                let err = remove_marked(text, nix(), "agentvm-drago").unwrap_err();
                assert!(format!("{err:#}").starts_with(&format!("fleet/secrets.nix:{line}: ")));
            }
        }
    }
}
