//! Which agentvm home a domain belongs to. Every home of a user shares that
//! user's libvirt session, so each home sees only the domains it made: those
//! whose metadata names it, or (domains made before homes were recorded) whose
//! disk lies under its `vms/` folder.

use std::path::Path;

use virt::domain::Domain;

use super::LocalBackend;
use crate::domain::VmState;
use crate::paths;

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Owner {
    /// This backend's home.
    Us,
    /// Another home, by its path when it can be told.
    Other(String),
}

impl LocalBackend {
    pub(super) fn owner(&self, dom: &Domain, state: &VmState) -> Owner {
        if let Some(home) = &state.home {
            return if *home == self.home_key {
                Owner::Us
            } else {
                Owner::Other(home.clone())
            };
        }
        let xml = dom.xml_desc(0).unwrap_or_default();
        let disk = disk_source(&xml);
        let ours = [
            self.home.root().to_path_buf(),
            Path::new(&self.home_key).to_path_buf(),
        ];
        match disk
            .as_deref()
            .and_then(|d| disk_home(Path::new(d), &state.name))
        {
            Some(home) if ours.contains(&home) => Owner::Us,
            Some(home) => Owner::Other(home.display().to_string()),
            None => Owner::Other(format!(
                "unknown (its disk {} is in no agentvm home's {}/ folder)",
                disk.as_deref().unwrap_or("-"),
                paths::VMS_DIR
            )),
        }
    }
}

/// The home whose `vms/NAME/` folder holds `disk`, if it is such a path.
fn disk_home(disk: &Path, name: &str) -> Option<std::path::PathBuf> {
    let vm_dir = disk.parent()?;
    let vms = vm_dir.parent()?;
    (vm_dir.file_name()? == name && vms.file_name()? == paths::VMS_DIR)
        .then(|| vms.parent().map(Path::to_path_buf))
        .flatten()
}

/// The file of the domain's first disk, as libvirt writes it
/// (`<source file='…'/>` inside the first `<disk>`).
fn disk_source(xml: &str) -> Option<String> {
    let disk = &xml[xml.find("<disk")?..];
    let source = &disk[disk.find("<source")?..];
    let rest = &source[source.find("file=")? + "file=".len()..];
    let quote = rest.chars().next()?;
    let value = &rest[1..][..rest[1..].find(quote)?];
    Some(
        value
            .replace("&apos;", "'")
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_names_its_home() {
        let xml = "<domain><devices><disk type='file' device='disk'><driver name='qemu'/>\
                   <source file='/home/a/agentvm/vms/drago/disk.qcow2'/></disk></devices></domain>";
        let disk = disk_source(xml).unwrap();
        assert_eq!(disk, "/home/a/agentvm/vms/drago/disk.qcow2");
        assert_eq!(
            disk_home(Path::new(&disk), "drago").unwrap(),
            Path::new("/home/a/agentvm")
        );
        assert_eq!(disk_home(Path::new(&disk), "luce"), None);
        assert_eq!(disk_home(Path::new("/var/disk.qcow2"), "drago"), None);
        assert_eq!(disk_source("<domain/>"), None);
    }
}
