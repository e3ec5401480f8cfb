//! The new VM's `[vms.NAME]` table in `agentvm.toml`: which image it names,
//! and the edit that adds it with the file's comments and order kept.

use anyhow::{Context, Result, bail};
use toml_edit::{DocumentMut, Item, Table, value};

use crate::spec::{Fleet, Name};

/// The fleet file's text with `[vms.NAME]` added (pinned ports, and with
/// `nixos` the host's flake attribute), everything else as it was.
pub fn add_vm(
    text: &str,
    name: &str,
    image: Option<&str>,
    nixos: bool,
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
    if nixos {
        vm.insert("nixos", value(format!(".#agent-{name}")));
    }
    vm.insert("ssh_port", value(i64::from(ssh_port)));
    vm.insert("spice_port", value(i64::from(spice_port)));
    vms.insert(name, Item::Table(vm));
    Ok(doc.to_string())
}

/// The `image` the new VM's table needs: `given` (which must be defined),
/// none when `[defaults]` names one, else the only image defined; with
/// several and no default, an error saying which flag or key to add.
pub(super) fn vm_image(
    fleet: &Fleet,
    text: &str,
    name: &Name,
    given: Option<&str>,
) -> Result<Option<String>> {
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

/// The fleet file's text with `[vms.NAME]` added (with `nixos` or not),
/// checked to still be a valid fleet file before anything is written.
pub(super) fn fleet_with_vm(
    fleet: &Fleet,
    name: &Name,
    image: Option<&str>,
    nixos: bool,
    ssh_port: u16,
    spice_port: u16,
) -> Result<String> {
    let text = std::fs::read_to_string(&fleet.file)
        .with_context(|| format!("reading {}", fleet.file.display()))?;
    let image = vm_image(fleet, &text, name, image)?;
    let edited = add_vm(
        &text,
        name.as_str(),
        image.as_deref(),
        nixos,
        ssh_port,
        spice_port,
    )?;
    Fleet::parse(&fleet.file, &edited)?;
    Ok(edited)
}
