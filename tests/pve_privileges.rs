//! The privileges agentvm names when Proxmox answers 403
//! (`backend::proxmox::privileges`) are the ones PVE 9.1's API schema states.

#[path = "pve/mod.rs"]
mod pve;

use agentvm::backend::proxmox::privileges::PRIVILEGES;
use pve::Schema;
use serde_json::Value;

/// The privilege names a `permissions.check` of the schema lists (`perm` checks,
/// also inside `and`/`or`).
fn checked(check: &Value, out: &mut Vec<String>) {
    let Some(items) = check.as_array() else {
        return;
    };
    match items.first().and_then(Value::as_str) {
        Some("perm") => {
            if let Some(privs) = items.get(2).and_then(Value::as_array) {
                out.extend(privs.iter().filter_map(Value::as_str).map(String::from));
            }
        }
        Some("and" | "or") => items[1..].iter().for_each(|c| checked(c, out)),
        _ => {}
    }
}

#[test]
fn every_named_privilege_is_the_schemas() {
    let schema = Schema::load();
    for (method, path, text) in PRIVILEGES {
        // A concrete path for the schema's matcher.
        let concrete = path
            .replace("{node}", "pve")
            .replace("{vmid}", "100")
            .replace("{snapname}", "s1")
            .replace("{storage}", "local")
            .replace("{volume}", "vol1")
            .replace(
                "{upid}",
                "UPID:pve:00001000:00100000:00000000:qmstart:100:root@pam:",
            );
        let info = schema
            .method_info(method, &concrete)
            .unwrap_or_else(|| panic!("{method} {path} is not in the schema"));
        let permissions = &info["permissions"];
        let mut named = Vec::new();
        checked(&permissions["check"], &mut named);
        let description = permissions["description"].as_str().unwrap_or_default();
        if named.is_empty() {
            // Checked in code; the schema describes it in words.
            let first = text.split_whitespace().next().unwrap();
            assert!(
                description.contains(first),
                "{method} {path}: the schema's description {description:?} does not name {first}"
            );
            continue;
        }
        for privilege in &named {
            let shown = text.contains(privilege.as_str())
                || (privilege.starts_with("VM.Config.") && text.contains("VM.Config.*"));
            assert!(
                shown,
                "{method} {path}: the schema checks {privilege}, the table says {text:?}"
            );
        }
    }
}
