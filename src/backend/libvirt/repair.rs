//! Repairs at daemon start: what a process killed mid-operation left behind.

use anyhow::Context;

use super::{LocalBackend, remove_dir};
use crate::backend::Result;

impl LocalBackend {
    /// Repairs what a process killed mid-operation can leave behind: VM folders
    /// with no domain (an interrupted `up` or `destroy`) and temp files of
    /// interrupted imports and atomic writes. Returns a line per repair.
    pub fn reconcile(&self) -> Result<Vec<String>> {
        let defined: std::collections::HashSet<String> = self
            .managed_domains()?
            .into_iter()
            .map(|(_, state)| state.name)
            .collect();
        let mut repaired = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.home.vms_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.path().is_dir() && !defined.contains(&name) {
                    remove_dir(&entry.path())?;
                    repaired.push(format!(
                        "removed {}: VM {name} has no domain (interrupted up or destroy)",
                        entry.path().display()
                    ));
                }
            }
        }
        for dir in [
            self.home.images_dir(),
            self.home.ssh_dir(),
            self.home.root().to_path_buf(),
        ] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                if crate::fsutil::TEMP_PREFIXES
                    .iter()
                    .any(|p| file.starts_with(p))
                {
                    std::fs::remove_file(entry.path())
                        .with_context(|| format!("removing {}", entry.path().display()))?;
                    repaired.push(format!(
                        "removed {} (left by an interrupted write)",
                        entry.path().display()
                    ));
                }
            }
        }
        Ok(repaired)
    }
}
