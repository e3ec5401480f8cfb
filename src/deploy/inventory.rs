//! `docs/machines.md`: the fleet's deployed machines, one table row each,
//! between two marker comments; everything else in the file is the user's and
//! is kept as written. Rows hold what stays put from boot to boot (ports, host
//! key fingerprint, purpose), so a deploy that changes nothing leaves the file
//! byte-identical; live state and addresses belong to `agentvm list`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::fsutil::write_atomic;

/// The inventory, relative to the fleet file's folder.
pub const INVENTORY_FILE: &str = "docs/machines.md";
/// The comment before agentvm's table.
pub const BEGIN: &str = "<!-- agentvm inventory: agentvm deploy and agentvm retire keep the table below; edit around it -->";
/// The comment after it.
pub const END: &str = "<!-- agentvm inventory end -->";
const HEADER: &str = "| name | backend | image | cpus | memory | disk | ssh port | spice port | host key | purpose |\n\
                      |---|---|---|---|---|---|---|---|---|---|\n";
/// What a new inventory file starts with.
const TITLE: &str = "# Machines\n\n";

/// One machine's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub name: String,
    pub backend: String,
    pub image: Option<String>,
    pub cpus: Option<u32>,
    pub memory: Option<String>,
    pub disk: Option<String>,
    pub ssh_port: Option<u16>,
    pub spice_port: Option<u16>,
    /// `SHA256:…` of the pinned host key.
    pub host_key: Option<String>,
    pub purpose: Option<String>,
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

impl Row {
    fn line(&self) -> String {
        let opt = |v: &Option<String>| v.as_deref().map_or("-".to_string(), cell);
        let num = |v: Option<u32>| v.map_or("-".to_string(), |n| n.to_string());
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(&self.name),
            cell(&self.backend),
            opt(&self.image),
            num(self.cpus),
            opt(&self.memory),
            opt(&self.disk),
            num(self.ssh_port.map(u32::from)),
            num(self.spice_port.map(u32::from)),
            opt(&self.host_key),
            opt(&self.purpose),
        )
    }
}

/// The inventory file of the fleet file `fleet_file`.
pub fn path(fleet_file: &Path) -> PathBuf {
    crate::spec::fleet_dir(fleet_file).join(INVENTORY_FILE)
}

/// The name in the first cell of a table line.
fn row_name(line: &str) -> Option<String> {
    let inner = line.trim().strip_prefix('|')?;
    let mut name = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => name.extend(chars.next()),
            '|' => return Some(name.trim().to_string()),
            c => name.push(c),
        }
    }
    None
}

/// `text` with `name`'s row set to `row` (`None`: removed). Rows stay sorted
/// by name. Without the markers, the table is added at the end.
pub fn edit(text: &str, file: &Path, name: &str, row: Option<&Row>) -> Result<String> {
    let (before, rows, after) = match (text.find(BEGIN), text.find(END)) {
        (Some(begin), Some(end)) if begin < end => {
            let block = &text[begin + BEGIN.len()..end];
            let rows: Vec<String> = block
                .lines()
                .map(str::trim)
                .filter(|l| {
                    l.starts_with('|') && !l.starts_with("|---") && !l.starts_with("| name |")
                })
                .map(str::to_string)
                .collect();
            (
                text[..begin].to_string(),
                rows,
                text[end + END.len()..].to_string(),
            )
        }
        (None, None) => {
            let mut before = if text.is_empty() {
                TITLE.to_string()
            } else {
                text.to_string()
            };
            if !before.ends_with('\n') {
                before.push('\n');
            }
            if !before.ends_with("\n\n") {
                before.push('\n');
            }
            (before, Vec::new(), "\n".to_string())
        }
        _ => bail!(
            "{}: one of agentvm's inventory markers is missing or they are out of order; \
             put back `{BEGIN}` and `{END}` around the table (or remove both), then run again",
            file.display()
        ),
    };
    let mut rows: Vec<(String, String)> = rows
        .into_iter()
        .filter_map(|line| row_name(&line).map(|n| (n, line)))
        .filter(|(n, _)| n != name)
        .collect();
    if let Some(row) = row {
        rows.push((row.name.clone(), row.line()));
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    if rows.is_empty() {
        // The last row went: take the table out with the blank lines it came with.
        let mut out = before;
        out.push_str(after.strip_prefix('\n').unwrap_or(&after));
        if out.ends_with("\n\n") {
            out.pop();
        }
        return Ok(out);
    }
    let mut out = before;
    out.push_str(BEGIN);
    out.push('\n');
    out.push_str(HEADER);
    for (_, line) in &rows {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(END);
    out.push_str(&after);
    Ok(out)
}

/// Sets (or with `None` removes) `name`'s row in the inventory at `file`,
/// writing it atomically only when it changes. Returns whether it changed.
pub fn update(file: &Path, name: &str, row: Option<&Row>) -> Result<bool> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if row.is_none() {
                return Ok(false);
            }
            String::new()
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    if row.is_none() && !text.contains(BEGIN) {
        return Ok(false);
    }
    let edited = edit(&text, file, name, row)?;
    if edited == text {
        return Ok(false);
    }
    let dir = file.parent().context("inventory folder")?;
    if edited.trim() == TITLE.trim() {
        // Only the title agentvm gave it is left: the file was agentvm's.
        std::fs::remove_file(file).with_context(|| format!("removing {}", file.display()))?;
        let _ = std::fs::remove_dir(dir);
        return Ok(true);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mode = std::fs::metadata(file).map_or(0o644, |m| {
        std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777
    });
    write_atomic(file, edited.as_bytes(), mode)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, purpose: &str) -> Row {
        Row {
            name: name.into(),
            backend: "local".into(),
            image: Some("nixos".into()),
            cpus: Some(2),
            memory: Some("2GiB".into()),
            disk: None,
            ssh_port: Some(2300),
            spice_port: Some(5990),
            host_key: Some("SHA256:abc".into()),
            purpose: Some(purpose.into()),
        }
    }

    #[test]
    fn adds_keeps_the_users_text_and_is_stable() {
        let file = Path::new("docs/machines.md");
        let original = "# Our machines\n\nThe laptop is not listed.\n";
        let one = edit(
            original,
            file,
            "drago",
            Some(&row("drago", "builds | tests")),
        )
        .unwrap();
        assert!(one.starts_with(original), "{one}");
        assert!(one.contains("| drago | local | nixos | 2 | 2GiB | - | 2300 | 5990 | SHA256:abc | builds \\| tests |\n"), "{one}");
        // The same row again: byte-identical.
        assert_eq!(
            edit(&one, file, "drago", Some(&row("drago", "builds | tests"))).unwrap(),
            one
        );
        // A second machine sorts before; text after the table stays.
        let with_after = format!("{one}\nNotes after.\n");
        let two = edit(&with_after, file, "alpha", Some(&row("alpha", "x"))).unwrap();
        let alpha = two.find("| alpha |").unwrap();
        assert!(alpha < two.find("| drago |").unwrap());
        assert!(two.ends_with("\nNotes after.\n"), "{two}");
        // Removing both gives back the user's text as it was.
        let none = edit(
            &edit(&two, file, "alpha", None).unwrap(),
            file,
            "drago",
            None,
        )
        .unwrap();
        assert_eq!(none, format!("{original}\n\nNotes after.\n"));
        assert_eq!(edit(original, file, "drago", None).unwrap(), original);
    }

    #[test]
    fn a_new_file_gets_a_title_and_a_lone_marker_is_an_error() {
        let file = Path::new("docs/machines.md");
        let made = edit("", file, "drago", Some(&row("drago", "p"))).unwrap();
        assert!(
            made.starts_with("# Machines\n\n<!-- agentvm inventory"),
            "{made}"
        );
        let err = edit(&format!("x\n{BEGIN}\n"), file, "drago", None).unwrap_err();
        assert!(err.to_string().contains("docs/machines.md"), "{err}");
    }

    #[test]
    fn update_writes_only_on_change_and_removing_from_nothing_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("docs/machines.md");
        assert!(!update(&file, "drago", None).unwrap());
        assert!(!file.exists());
        assert!(update(&file, "drago", Some(&row("drago", "p"))).unwrap());
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        assert!(!update(&file, "drago", Some(&row("drago", "p"))).unwrap());
        assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), mtime);
        assert!(update(&file, "drago", None).unwrap());
        assert!(
            !file.exists(),
            "the file agentvm made goes with its last row"
        );
        assert!(!file.parent().unwrap().exists());
    }
}
