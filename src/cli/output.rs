//! Human-readable tables and JSON output.

use std::fmt::Write as _;

use serde::Serialize;

use crate::backend::{Plan, VmStatus};
use crate::protocol::Outcome;

pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// One VM's outcome as a JSON object: its fields, with the VM's `name`.
pub fn outcome_json(name: &str, outcome: &Outcome) -> anyhow::Result<serde_json::Value> {
    let mut value = serde_json::to_value(outcome)?;
    if let Some(object) = value.as_object_mut() {
        object.remove("outcome");
        object
            .entry("name")
            .or_insert_with(|| name.to_string().into());
    }
    Ok(value)
}

/// What `plan` shows: per VM create/update/start/no changes, then the changes.
pub fn plan_text(plans: &[Plan]) -> String {
    let mut out = String::new();
    for plan in plans {
        let what = if plan.create {
            "create"
        } else if plan.changes.is_empty() && plan.resize.is_none() {
            if plan.start { "start" } else { "no changes" }
        } else {
            "update"
        };
        let _ = writeln!(out, "{} ({}): {what}", plan.name, plan.backend);
        for change in &plan.changes {
            let _ = match &change.old {
                None => writeln!(out, "  + {} = {}", change.key, change.new),
                Some(old) => writeln!(out, "  ~ {}: {old} -> {}", change.key, change.new),
            };
        }
        if let Some(size) = &plan.resize {
            let _ = writeln!(out, "  grow disk to {size}");
        }
        if plan.start && what != "start" {
            let _ = writeln!(out, "  start");
        }
        if plan.restart_needed {
            let _ = writeln!(out, "  (running: a restart applies this)");
        }
    }
    out
}

fn port(p: Option<u16>) -> String {
    p.map_or_else(|| "-".to_string(), |p| p.to_string())
}

pub fn status_table(rows: &[VmStatus]) -> String {
    let header = ["NAME", "STATE", "BACKEND", "SSH", "SPICE", "IMAGE", "NOTE"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let mut notes = Vec::new();
            if r.readonly {
                notes.push("readonly".to_string());
            }
            if r.restart_needed {
                notes.push("restart needed".to_string());
            }
            if !r.in_spec {
                notes.push("not in agentvm.toml".to_string());
            }
            if !r.forwards.is_empty() {
                let list: Vec<String> = r
                    .forwards
                    .iter()
                    .map(|f| {
                        let live = if f.live { " (live)" } else { "" };
                        format!("{}{live}", f.forward())
                    })
                    .collect();
                notes.push(format!("forwards {}", list.join(" ")));
            }
            for share in &r.shares {
                let ro = if share.readonly { " (ro)" } else { "" };
                notes.push(format!(
                    "share {}:{}{ro}",
                    share.host.display(),
                    share.guest
                ));
                if let Some(problem) = &share.problem {
                    notes.push(format!("PROBLEM: {problem}"));
                }
            }
            if !r.egress.is_open() {
                notes.push(match &r.egress_tunnel {
                    Some(tunnel) => format!("egress {} (proxy {tunnel})", r.egress),
                    None => format!("egress {}", r.egress),
                });
            }
            [
                r.name.clone(),
                r.state.as_str().to_string(),
                r.backend.clone(),
                port(r.ssh_port),
                port(r.spice_port),
                r.image.clone().unwrap_or_else(|| "-".into()),
                notes.join(", "),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cols: Vec<&str>| {
        let text: Vec<String> = cols
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &cells {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// One VM as `agentvm inventory` shows it.
#[derive(Debug, Serialize)]
pub struct InventoryRow {
    pub name: String,
    pub backend: String,
    pub image: Option<String>,
    pub cpus: Option<u32>,
    pub memory: Option<String>,
    pub disk: Option<String>,
    pub ssh_port: Option<u16>,
    pub spice_port: Option<u16>,
    pub state: String,
    pub purpose: Option<String>,
}

/// A Markdown table, like a hand-kept `docs/machines.md`. It holds what stays
/// put from boot to boot; addresses come and go with the guest and belong to `list`.
pub fn inventory_markdown(rows: &[InventoryRow]) -> String {
    let cell = |text: &str| text.replace('|', "\\|").replace('\n', " ");
    let opt = |v: &Option<String>| v.as_deref().map_or("-".to_string(), cell);
    let mut out = String::from(
        "| name | backend | image | cpus | memory | disk | ssh | spice | state | purpose |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(&r.name),
            cell(&r.backend),
            opt(&r.image),
            r.cpus.map_or("-".into(), |c| c.to_string()),
            opt(&r.memory),
            opt(&r.disk),
            port(r.ssh_port),
            port(r.spice_port),
            r.state,
            opt(&r.purpose),
        );
    }
    out
}

/// `NAME: message`, without saying the name twice when the message starts with it.
pub fn vm_error(name: &str, message: &str) -> String {
    if message.starts_with(&format!("{name}: ")) {
        message.to_string()
    } else {
        format!("{name}: {message}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_notes_name_the_forwards() {
        let mut row = VmStatus::absent("web", "local", None);
        row.in_spec = true;
        row.forwards = vec![
            crate::backend::ForwardStatus::new(&"8080:80".parse().unwrap(), false),
            crate::backend::ForwardStatus::new(&"0.0.0.0:9000:8000".parse().unwrap(), true),
        ];
        let table = status_table(&[row]);
        assert!(
            table.contains("forwards 127.0.0.1:8080:80 0.0.0.0:9000:8000 (live)"),
            "{table}"
        );
    }

    #[test]
    fn status_notes_name_the_shares_and_their_problems() {
        let mut row = VmStatus::absent("web", "local", None);
        row.in_spec = true;
        row.shares = vec![crate::backend::ShareStatus {
            host: "/home/u/site".into(),
            guest: "/work".into(),
            kind: crate::spec::ShareKind::Virtiofs,
            readonly: true,
            tag: "agentvm0".into(),
            server_running: Some(false),
            problem: Some("the virtiofsd serving /home/u/site stopped".into()),
        }];
        let table = status_table(&[row]);
        assert!(table.contains("share /home/u/site:/work (ro)"), "{table}");
        assert!(
            table.contains("PROBLEM: the virtiofsd serving /home/u/site stopped"),
            "{table}"
        );
    }

    #[test]
    fn inventory_is_a_markdown_table_with_escaped_cells() {
        let rows = [InventoryRow {
            name: "drago".into(),
            backend: "local".into(),
            image: Some("nixos".into()),
            cpus: Some(4),
            memory: Some("8GiB".into()),
            disk: None,
            ssh_port: Some(2222),
            spice_port: Some(5900),
            state: "running".into(),
            purpose: Some("builds | ships\nthings".into()),
        }];
        let md = inventory_markdown(&rows);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[2],
            "| drago | local | nixos | 4 | 8GiB | - | 2222 | 5900 | running | builds \\| ships things |"
        );
    }
}
