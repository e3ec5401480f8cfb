//! A node's storages (`GET /nodes/{node}/storage`) and which one to use for
//! what content (`import` for uploads, `images` for disks), with errors that
//! name the storages there and how to let one hold the content.

use serde_json::Value;

use super::{ProxmoxBackend, pve};
use crate::backend::Result;

/// A storage of a node, from `GET /nodes/{node}/storage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Storage {
    pub name: String,
    pub content: Vec<String>,
    /// Enabled and active (an unset flag counts as set).
    pub usable: bool,
}

impl Storage {
    fn holds(&self, content: &str) -> bool {
        self.content.iter().any(|c| c == content)
    }
}

/// PVE's booleans arrive as 0/1 or true/false.
fn flag(value: &Value) -> Option<bool> {
    value.as_bool().or_else(|| value.as_u64().map(|n| n != 0))
}

fn storages(list: &Value) -> Vec<Storage> {
    list.as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|s| {
                    Some(Storage {
                        name: s["storage"].as_str()?.to_string(),
                        content: s["content"]
                            .as_str()
                            .unwrap_or_default()
                            .split(',')
                            .map(|c| c.trim().to_string())
                            .filter(|c| !c.is_empty())
                            .collect(),
                        usable: flag(&s["enabled"]) != Some(false)
                            && flag(&s["active"]) != Some(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `local (iso,vztmpl,backup), local-lvm (images,rootdir)`.
fn describe(storages: &[Storage]) -> String {
    if storages.is_empty() {
        return "none".to_string();
    }
    storages
        .iter()
        .map(|s| {
            format!(
                "{} ({}{})",
                s.name,
                s.content.join(","),
                if s.usable { "" } else { "; not active" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The storage holding `content` to use on `node`: `wanted` (the setting
/// `field` names), which must be there and hold it, else the first that does.
pub(super) fn pick(
    storages: &[Storage],
    content: &str,
    (field, wanted): (&str, Option<&str>),
    node: &str,
) -> std::result::Result<String, String> {
    let all = describe(storages);
    if let Some(wanted) = wanted {
        return match storages.iter().find(|s| s.name == wanted) {
            None => Err(format!(
                "{field}: node {node} has no storage {wanted:?} (storages: {all})"
            )),
            Some(s) if !s.holds(content) => Err(format!(
                "{field}: storage {wanted} on node {node} does not hold {content:?} content \
                 (storages: {all}); {}",
                enable(wanted, &s.content, content)
            )),
            Some(s) if !s.usable => Err(format!(
                "{field}: storage {wanted} on node {node} is disabled or not active"
            )),
            Some(s) => Ok(s.name.clone()),
        };
    }
    storages
        .iter()
        .find(|s| s.usable && s.holds(content))
        .map(|s| s.name.clone())
        .ok_or_else(|| {
            let how = match storages.iter().find(|s| s.usable) {
                Some(s) => enable(&s.name, &s.content, content),
                None => format!("enable {content:?} content on one of them"),
            };
            format!(
                "node {node} has no active storage with {content:?} content (storages: {all}); {how}, \
                 or name one as {field}"
            )
        })
}

/// How to let `storage` hold `content` too.
fn enable(storage: &str, has: &[String], content: &str) -> String {
    let mut list = has.to_vec();
    list.push(content.to_string());
    format!(
        "add {content:?} to its content in the web UI (Datacenter → Storage → Edit → Content) \
         or with `pvesm set {storage} --content {}`",
        list.join(",")
    )
}

impl ProxmoxBackend {
    /// The storages of `node`.
    pub(super) fn node_storages(&self, node: &str) -> Result<Vec<Storage>> {
        let list = self
            .client
            .get(&format!("/nodes/{node}/storage"), &[])
            .map_err(pve)?;
        Ok(storages(&list))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node_storages() -> Vec<Storage> {
        storages(&json!([
            {"storage": "local", "content": "iso,vztmpl,backup", "type": "dir", "active": 1, "enabled": 1},
            {"storage": "local-lvm", "content": "images,rootdir", "type": "lvmthin", "active": 1, "enabled": 1},
            {"storage": "nfs", "content": "import,images", "type": "nfs", "active": 0, "enabled": 1},
            {"storage": "imports", "content": "import", "type": "dir", "active": 1, "enabled": 1},
        ]))
    }

    #[test]
    fn storages_are_picked_by_content_and_setting() {
        let all = node_storages();
        let field = "backends.lab.import_storage";
        assert_eq!(
            pick(&all, "import", (field, None), "pve"),
            Ok("imports".into())
        );
        assert_eq!(
            pick(&all, "images", ("backends.lab.storage", None), "pve"),
            Ok("local-lvm".into())
        );
        assert_eq!(
            pick(&all, "import", (field, Some("imports")), "pve"),
            Ok("imports".into())
        );
        let unknown = pick(&all, "import", (field, Some("tank")), "pve").unwrap_err();
        assert!(
            unknown.starts_with("backends.lab.import_storage: node pve has no storage \"tank\"")
                && unknown.contains("local-lvm (images,rootdir)"),
            "{unknown}"
        );
        let wrong = pick(&all, "import", (field, Some("local")), "pve").unwrap_err();
        assert!(
            wrong.contains("does not hold \"import\"")
                && wrong.contains("pvesm set local --content iso,vztmpl,backup,import"),
            "{wrong}"
        );
        let inactive = pick(&all, "import", (field, Some("nfs")), "pve").unwrap_err();
        assert!(inactive.contains("not active"), "{inactive}");
    }

    #[test]
    fn no_import_storage_names_the_storages_and_how_to_enable_import() {
        let all: Vec<Storage> = node_storages()
            .into_iter()
            .filter(|s| s.name != "imports")
            .collect();
        let err = pick(&all, "import", ("backends.lab.import_storage", None), "pve").unwrap_err();
        assert!(
            err.contains("node pve has no active storage with \"import\" content")
                && err.contains("local (iso,vztmpl,backup)")
                && err.contains("nfs (import,images; not active)")
                && err.contains("Datacenter → Storage → Edit → Content")
                && err.contains("pvesm set local --content iso,vztmpl,backup,import")
                && err.contains("backends.lab.import_storage"),
            "{err}"
        );
    }
}
