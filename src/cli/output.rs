//! Human-readable tables and JSON output.

use std::fmt::Write as _;

use serde::Serialize;

use crate::backend::VmStatus;

pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
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
                notes.push("readonly");
            }
            if r.restart_needed {
                notes.push("restart needed");
            }
            if !r.in_spec {
                notes.push("not in agentvm.toml");
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
