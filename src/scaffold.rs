//! `agentvm new NAME`: a host config from the template and a `[vms.NAME]` table,
//! added to `agentvm.toml` with its comments and order kept.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use toml_edit::{DocumentMut, Item, Table, value};

use crate::fsutil::write_atomic;
use crate::spec::{Fleet, Name};

/// The host config `agentvm new` copies, relative to the fleet file's folder.
pub const TEMPLATE: &str = "hosts/agent-template/default.nix";
/// The placeholder the template has for the agent's name.
pub const PLACEHOLDER: &str = "@NAME@";

/// What `agentvm new` made.
#[derive(Debug, serde::Serialize)]
pub struct Scaffolded {
    pub name: String,
    pub host_config: PathBuf,
    pub ssh_port: u16,
    pub spice_port: u16,
}

/// `hosts/agent-NAME/default.nix` beside the fleet file.
pub fn host_config_path(fleet_file: &Path, name: &str) -> PathBuf {
    fleet_dir(fleet_file).join(format!("hosts/agent-{name}/default.nix"))
}

fn fleet_dir(fleet_file: &Path) -> PathBuf {
    fleet_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The fleet file's text with `[vms.NAME]` added (pinned ports, the host's
/// flake attribute), everything else as it was.
pub fn add_vm(
    text: &str,
    name: &str,
    image: Option<&str>,
    ssh_port: u16,
    spice_port: u16,
) -> Result<String> {
    let mut doc: DocumentMut = text.parse().context("parsing agentvm.toml for editing")?;
    let vms = doc
        .entry("vms")
        .or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        })
        .as_table_mut()
        .context("`vms` in agentvm.toml is not a table")?;
    if vms.contains_key(name) {
        bail!("a VM named {name:?} already exists in agentvm.toml");
    }
    let mut vm = Table::new();
    if let Some(image) = image {
        vm.insert("image", value(image));
    }
    vm.insert("nixos", value(format!(".#agent-{name}")));
    vm.insert("ssh_port", value(i64::from(ssh_port)));
    vm.insert("spice_port", value(i64::from(spice_port)));
    vms.insert(name, Item::Table(vm));
    Ok(doc.to_string())
}

/// The `image` the new VM's table needs: `given` (which must be defined),
/// none when `[defaults]` names one, else the only image defined; with
/// several and no default, an error saying which flag or key to add.
fn vm_image(fleet: &Fleet, text: &str, name: &Name, given: Option<&str>) -> Result<Option<String>> {
    let file = fleet.file.display();
    let known: Vec<&str> = fleet.images.keys().map(Name::as_str).collect();
    if let Some(image) = given {
        if !known.contains(&image) {
            bail!(
                "{file}: no image named {image:?} (defined: {}); add an [images.{image}] table or pick one of those",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
        }
        return Ok(Some(image.to_string()));
    }
    let doc: DocumentMut = text.parse().context("parsing agentvm.toml")?;
    if doc.get("defaults").and_then(|d| d.get("image")).is_some() {
        return Ok(None);
    }
    match known.as_slice() {
        [only] => Ok(Some(only.to_string())),
        [] => bail!(
            "{file}: no image is defined for vms.{name}: add an [images.NAME] table (e.g. flake = \".#agent-base-image\") and `image = \"NAME\"` in [defaults], then run agentvm new {name} again"
        ),
        several => bail!(
            "{file}: vms.{name} needs an image and [defaults] names none: run agentvm new {name} --image IMAGE (one of: {}), or set `image` in [defaults]",
            several.join(", ")
        ),
    }
}

/// Writes the host config from the template and adds the VM to the fleet file.
/// Nothing is written if either step would fail.
pub fn scaffold(
    fleet: &Fleet,
    name: &Name,
    image: Option<&str>,
    ssh_port: u16,
    spice_port: u16,
) -> Result<Scaffolded> {
    if fleet.vms.contains_key(name) {
        bail!("{}: a VM named {name} already exists", fleet.file.display());
    }
    let host_config = host_config_path(&fleet.file, name.as_str());
    if host_config.exists() {
        bail!("{} already exists", host_config.display());
    }
    let template_path = fleet_dir(&fleet.file).join(TEMPLATE);
    let template = std::fs::read_to_string(&template_path)
        .with_context(|| format!("reading the host template {}", template_path.display()))?;
    let text = std::fs::read_to_string(&fleet.file)
        .with_context(|| format!("reading {}", fleet.file.display()))?;
    let image = vm_image(fleet, &text, name, image)?;
    let edited = add_vm(&text, name.as_str(), image.as_deref(), ssh_port, spice_port)?;
    // The edited file must still be a valid fleet file before anything is written.
    Fleet::parse(&fleet.file, &edited)?;

    let dir = host_config.parent().context("host config folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(
        &host_config,
        template.replace(PLACEHOLDER, name.as_str()).as_bytes(),
        0o644,
    )?;
    if let Err(e) = write_atomic(&fleet.file, edited.as_bytes(), 0o644) {
        if let Err(cleanup) = std::fs::remove_dir_all(dir) {
            return Err(e.context(format!(
                "and removing {} again failed too ({cleanup}): remove it by hand",
                dir.display()
            )));
        }
        return Err(e);
    }
    Ok(Scaffolded {
        name: name.to_string(),
        host_config,
        ssh_port,
        spice_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &str = "# my agents\n[defaults]\nimage = \"nixos\" # the base\n\n[images.nixos]\nflake = \".#agent-base-image\"\n\n# drago builds things\n[vms.drago]\nnixos = \".#agent-drago\"\n";

    #[test]
    fn adds_a_vm_keeping_comments_and_order() {
        let edited = add_vm(FLEET, "luce", None, 2301, 5901).unwrap();
        assert!(
            edited.starts_with(FLEET),
            "existing text kept as it was:\n{edited}"
        );
        assert!(
            edited.ends_with(
                "\n[vms.luce]\nnixos = \".#agent-luce\"\nssh_port = 2301\nspice_port = 5901\n"
            ),
            "{edited}"
        );
        let fleet = Fleet::parse(Path::new("/x/agentvm.toml"), &edited).unwrap();
        assert_eq!(fleet.vm("luce").unwrap().ssh_port, Some(2301));
    }

    #[test]
    fn an_existing_name_is_refused() {
        let err = add_vm(FLEET, "drago", None, 2301, 5901)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
    }

    #[test]
    fn a_file_without_vms_gets_a_vms_table() {
        let edited = add_vm("[defaults]\ncpus = 2\n", "a", None, 2222, 5900).unwrap();
        assert_eq!(
            edited,
            "[defaults]\ncpus = 2\n\n[vms.a]\nnixos = \".#agent-a\"\nssh_port = 2222\nspice_port = 5900\n"
        );
    }

    #[test]
    fn the_image_is_the_given_one_the_default_or_the_only_one() {
        let fleet = |text: &str| Fleet::parse(Path::new("/x/agentvm.toml"), text).unwrap();
        let name = Name::new("luce").unwrap();
        let one = "[images.base]\nfile = \"/b.qcow2\"\n";
        let two = "[images.a]\nfile = \"/a.qcow2\"\n[images.b]\nfile = \"/b.qcow2\"\n";
        // The only image is used; --image must name a defined one.
        assert_eq!(
            vm_image(&fleet(one), one, &name, None).unwrap().as_deref(),
            Some("base")
        );
        let err = vm_image(&fleet(one), one, &name, Some("nope"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no image named \"nope\"") && err.contains("base"),
            "{err}"
        );
        // [defaults] image: nothing to add.
        let with_default = format!("[defaults]\nimage = \"a\"\n{two}");
        assert_eq!(
            vm_image(&fleet(&with_default), &with_default, &name, None).unwrap(),
            None
        );
        // Several and no default: say the flag and the key.
        let err = vm_image(&fleet(two), two, &name, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--image IMAGE (one of: a, b)") && err.contains("[defaults]"),
            "{err}"
        );
        assert_eq!(
            vm_image(&fleet(two), two, &name, Some("b"))
                .unwrap()
                .as_deref(),
            Some("b")
        );
        // None at all.
        let err = vm_image(&fleet(""), "", &name, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no image is defined") && err.contains("[images.NAME]"),
            "{err}"
        );
    }
}
