//! `agentvm new NAME`: a host config from the template and a `[vms.NAME]` table,
//! added to `agentvm.toml` with its comments and order kept, plus a user
//! module and a home-manager file where the project has folders for them
//! (none invented where it has not).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use toml_edit::{DocumentMut, Item, Table, value};

use crate::fsutil::write_atomic;
use crate::spec::{Fleet, Name, fleet_dir};

/// The host config `agentvm new` copies, relative to the fleet file's folder.
pub const TEMPLATE: &str = "hosts/agent-template/default.nix";
/// The placeholder the template has for the agent's name.
pub const PLACEHOLDER: &str = "@NAME@";

/// `hosts/agent-NAME/default.nix` beside the fleet file.
pub fn host_config_path(fleet_file: &Path, name: &str) -> PathBuf {
    fleet_dir(fleet_file).join(format!("hosts/agent-{name}/default.nix"))
}

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

/// Where a project keeps its home-manager configurations, relative to the
/// fleet file's folder: `new` writes `agent-NAME.nix` into the first of these
/// that is a Nix folder (see [`is_nix_folder`]), and no home-manager file when
/// none is.
pub const HOME_MANAGER_DIRS: &[&str] = &["home", "home-manager", "homes"];
/// Where a project keeps its NixOS user modules, likewise: the first that is
/// a Nix folder gets `agent-NAME.nix`; with none, `new` writes no user module.
pub const USER_MODULE_DIRS: &[&str] = &["users", "modules/users"];
/// The file in a home-manager or user-module folder that `new` copies (with
/// [`PLACEHOLDER`] replaced) instead of its built-in default.
pub const FOLDER_TEMPLATE: &str = "agent-template.nix";

/// What `agentvm new` made.
#[derive(Debug, serde::Serialize)]
pub struct Scaffolded {
    pub name: String,
    /// `hosts/agent-NAME/default.nix`; none in a project without
    /// `hosts/agent-template/default.nix` (no NixOS layout: the VM gets no `nixos`).
    pub host_config: Option<PathBuf>,
    /// `<home-manager folder>/agent-NAME.nix`, when the project has such a folder.
    pub home_manager: Option<PathBuf>,
    /// `<user-module folder>/agent-NAME.nix`, when the project has such a folder.
    pub user_module: Option<PathBuf>,
    /// Whether the host config imports the user module (false when there is
    /// none, or the host template has no `imports = [ … ];` list).
    pub user_module_imported: bool,
    /// What is left to wire in by hand, one sentence each.
    pub wire_by_hand: Vec<String>,
    pub ssh_port: u16,
    pub spice_port: u16,
}

/// A file `new` writes beside the host config.
struct ExtraFile {
    kind: Extra,
    /// Its folder, relative to the fleet file's folder.
    folder: &'static str,
    path: PathBuf,
    text: String,
}

/// The kinds of file `new` writes beside the host config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extra {
    HomeManager,
    UserModule,
}

impl Extra {
    fn dirs(self) -> &'static [&'static str] {
        match self {
            Extra::HomeManager => HOME_MANAGER_DIRS,
            Extra::UserModule => USER_MODULE_DIRS,
        }
    }
}

/// Whether `dir` is a folder of Nix files: it holds a `.nix` file or a
/// folder with a `default.nix`. A `home/` beside the fleet file that is not
/// (the fleet file in `/`, a state folder) is no home-manager layout.
pub fn is_nix_folder(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let path = entry.path();
        if path.is_dir() {
            path.join("default.nix").is_file()
        } else {
            path.extension().is_some_and(|ext| ext == "nix") && path.is_file()
        }
    })
}

/// The first of `candidates` (relative to `root`) that is a Nix folder.
fn detect(root: &Path, candidates: &[&'static str]) -> Option<&'static str> {
    candidates
        .iter()
        .copied()
        .find(|dir| is_nix_folder(&root.join(dir)))
}

/// How the host config (`hosts/agent-NAME/default.nix`) names
/// `<folder>/agent-NAME.nix`.
fn from_host(folder: &str, name: &str) -> String {
    format!("../../{folder}/agent-{name}.nix")
}

/// The built-in file of `kind` for `name`, written when the folder has no
/// [`FOLDER_TEMPLATE`].
fn default_text(kind: Extra, folder: &str, name: &str) -> String {
    match kind {
        Extra::HomeManager => {
            let import = from_host(folder, name);
            format!(
                "# {name}'s home-manager configuration, made by `agentvm new {name}`.\n\
                 # Nothing imports it yet, since home-manager setups differ: wire it into\n\
                 # yours, e.g. with the home-manager NixOS module in hosts/agent-{name}/default.nix:\n\
                 #   home-manager.users.{name} = import {import};\n\
                 {{ pkgs, ... }}:\n\
                 \n\
                 {{\n  \
                   home.username = \"{name}\";\n  \
                   home.homeDirectory = \"/home/{name}\";\n  \
                   home.packages = with pkgs; [ ];\n\n  \
                   # The release this home was first made with (as system.stateVersion in\n  \
                   # hosts/common/agent-base.nix); keep it when upgrading.\n  \
                   home.stateVersion = \"25.05\";\n\
                 }}\n"
            )
        }
        Extra::UserModule => format!(
            "# {name}'s account, made by `agentvm new {name}` for hosts/agent-{name}.\n\
             # hosts/common/agent-base.nix already makes the user that agentvm.user names\n\
             # (\"{name}\" in hosts/agent-{name}) a normal wheel user with passwordless sudo and\n\
             # the VM's SSH keys: the lib.mkDefault lines only count on a host without that\n\
             # module. Put what {name} needs beyond it here.\n\
             {{ lib, ... }}:\n\
             \n\
             {{\n  \
               users.users.{name} = {{\n    \
                 isNormalUser = lib.mkDefault true;\n    \
                 # A lib.mkDefault list is dropped where another module sets extraGroups:\n    \
                 # for more groups, write extraGroups = [ \"wheel\" \"docker\" ]; instead.\n    \
                 extraGroups = lib.mkDefault [ \"wheel\" ];\n    \
                 description = \"{name}\";\n  \
               }};\n\
             }}\n"
        ),
    }
}

/// The text of `<folder>/agent-NAME.nix`: the folder's [`FOLDER_TEMPLATE`]
/// with the name filled in and a first line saying where it came from, else
/// the built-in default.
fn extra_text(root: &Path, kind: Extra, folder: &str, name: &str) -> Result<String> {
    let template = root.join(folder).join(FOLDER_TEMPLATE);
    match std::fs::read_to_string(&template) {
        Ok(text) => Ok(format!(
            "# Made by `agentvm new {name}` from {folder}/{FOLDER_TEMPLATE}.\n{}",
            text.replace(PLACEHOLDER, name)
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(default_text(kind, folder, name)),
        Err(e) => Err(e).with_context(|| format!("reading {}", template.display())),
    }
}

/// `text` with comments and string contents blanked out (same length), so
/// that brackets and names found in it are Nix code.
fn code_only(text: &str) -> Vec<u8> {
    let mut out = text.as_bytes().to_vec();
    let b = text.as_bytes();
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    while i < b.len() {
        match b[i] {
            b'#' => {
                let end = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |p| i + p);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = text[i + 2..].find("*/").map_or(b.len(), |p| i + 2 + p + 2);
                blank(&mut out, i, end);
                i = end;
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                let close = j.min(b.len());
                blank(&mut out, i + 1, close);
                i = close + 1;
            }
            b'\'' if b.get(i + 1) == Some(&b'\'') => {
                // An indented string; `'''`, `''$` and `''\x` are escapes in it.
                let mut j = i + 2;
                while j < b.len() {
                    if b[j] == b'\'' && b.get(j + 1) == Some(&b'\'') {
                        match b.get(j + 2) {
                            Some(b'\'') | Some(b'$') => j += 3,
                            Some(b'\\') => j += 4,
                            _ => break,
                        }
                    } else {
                        j += 1;
                    }
                }
                let end = (j + 2).min(b.len());
                blank(&mut out, i + 2, j.min(b.len()));
                i = end;
            }
            _ => i += 1,
        }
    }
    out
}

/// The host config `text` with `import` added as the last entry of its
/// `imports = [ … ];` list, the list's layout kept (one line, or one entry a
/// line with the entries' indentation); `None` when it has no such list.
pub fn add_import(text: &str, import: &str) -> Option<String> {
    let code = code_only(text);
    let is_name = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'\'' | b'-' | b'.');
    let skip_ws = |mut i: usize| {
        while i < code.len() && code[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let open = (0..code.len()).find_map(|i| {
        if !code[i..].starts_with(b"imports") || (i > 0 && is_name(code[i - 1])) {
            return None;
        }
        let eq = skip_ws(i + "imports".len());
        if code.get(eq) != Some(&b'=') {
            return None;
        }
        let open = skip_ws(eq + 1);
        (code.get(open) == Some(&b'[')).then_some(open)
    })?;
    let mut depth = 0usize;
    let close = (open..code.len()).find(|&i| {
        match code[i] {
            b'[' => depth += 1,
            b']' => depth -= 1,
            _ => {}
        }
        depth == 0
    })?;
    let inside = &text[open + 1..close];
    let mut out = String::with_capacity(text.len() + import.len() + 8);
    out.push_str(&text[..open + 1]);
    if !inside.contains('\n') {
        // `[ a b ]`: the entry goes after the last one, spacing kept.
        let items = inside.trim_end();
        let trailing = &inside[items.len()..];
        out.push_str(items);
        out.push(' ');
        out.push_str(import);
        out.push_str(if !trailing.is_empty() {
            trailing
        } else if items.is_empty() || items.starts_with(char::is_whitespace) {
            " "
        } else {
            ""
        });
    } else {
        let line_start = inside.rfind('\n').map_or(0, |p| p + 1);
        let before_close = &inside[line_start..];
        if before_close.trim().is_empty() {
            // `]` on its own line: a line like the entries' before it.
            let closing_indent = before_close;
            let indent = inside[..line_start]
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| &l[..l.len() - l.trim_start().len()])
                .map_or_else(|| format!("{closing_indent}  "), str::to_string);
            out.push_str(&inside[..line_start]);
            out.push_str(&format!("{indent}{import}\n"));
            out.push_str(before_close);
        } else {
            // `  b ]` on the last line: after b.
            let items = inside.trim_end();
            out.push_str(items);
            out.push(' ');
            out.push_str(import);
            out.push_str(&inside[items.len()..]);
        }
    }
    out.push_str(&text[close..]);
    Some(out)
}

/// Fails, naming the file, when something is at `path` already (a dangling
/// symlink included).
fn refuse_existing(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => bail!(
            "{} already exists: agentvm new writes over no file, so nothing was written",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("checking {}", path.display())),
    }
}

/// What one `scaffold` run has written so far, to remove again if a later
/// step fails.
#[derive(Default)]
struct Written {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Written {
    /// Creates `dir` and the folders above it that are missing, remembering
    /// which were made.
    fn create_dir(&mut self, dir: &Path) -> Result<()> {
        let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Outermost first, so that removing them in reverse goes innermost first.
        self.dirs
            .extend(missing.into_iter().rev().map(Path::to_path_buf));
        Ok(())
    }

    fn write(&mut self, path: &Path, text: &str) -> Result<()> {
        write_atomic(path, text.as_bytes(), 0o644)?;
        self.files.push(path.to_path_buf());
        Ok(())
    }

    /// Removes what was written, newest first; `err` gains the paths that
    /// could not be removed.
    fn undo(self, err: anyhow::Error) -> anyhow::Error {
        let mut left = Vec::new();
        for file in self.files.iter().rev() {
            if let Err(e) = std::fs::remove_file(file) {
                left.push(format!("{} ({e})", file.display()));
            }
        }
        for dir in self.dirs.iter().rev() {
            if let Err(e) = std::fs::remove_dir(dir) {
                left.push(format!("{} ({e})", dir.display()));
            }
        }
        if left.is_empty() {
            err
        } else {
            err.context(format!(
                "and removing what was written failed: remove by hand {}",
                left.join(", ")
            ))
        }
    }
}

/// Writes the host config from the template, the home-manager file and user
/// module when the project has folders for them, and adds the VM to the fleet
/// file. Nothing is written when a file is there already or a step would
/// fail; a write that fails midway removes what this run wrote.
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
    let root = fleet_dir(&fleet.file);
    let host_config = host_config_path(&fleet.file, name.as_str());
    let template_path = root.join(TEMPLATE);
    let template = match std::fs::read_to_string(&template_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return vm_only(fleet, name, image, ssh_port, spice_port);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("reading the host template {}", template_path.display()));
        }
    };
    let mut host_text = template.replace(PLACEHOLDER, name.as_str());

    let mut extras = Vec::new();
    for kind in [Extra::UserModule, Extra::HomeManager] {
        if let Some(folder) = detect(root, kind.dirs()) {
            let path = root.join(folder).join(format!("agent-{name}.nix"));
            let text = extra_text(root, kind, folder, name.as_str())?;
            extras.push(ExtraFile {
                kind,
                folder,
                path,
                text,
            });
        }
    }
    for path in std::iter::once(&host_config).chain(extras.iter().map(|e| &e.path)) {
        refuse_existing(path)?;
    }

    let mut user_module_imported = false;
    let mut wire_by_hand = Vec::new();
    let host_rel = format!("hosts/agent-{name}/default.nix");
    for ExtraFile { kind, folder, .. } in &extras {
        let import = from_host(folder, name.as_str());
        let shown = format!("{folder}/agent-{name}.nix");
        match kind {
            Extra::UserModule => {
                if host_text.contains(&import) {
                    // The template imports it already.
                    user_module_imported = true;
                } else if let Some(text) = add_import(&host_text, &import) {
                    host_text = text;
                    user_module_imported = true;
                } else {
                    wire_by_hand.push(format!(
                        "add {import} to the imports of {host_rel} ({} has no `imports = [ … ];` list)",
                        template_path.display()
                    ));
                }
            }
            Extra::HomeManager => {
                if !host_text.contains(&import) {
                    wire_by_hand.push(format!(
                        "wire {shown} into your home-manager setup, e.g. `home-manager.users.{name} = import {import};` in {host_rel}"
                    ));
                }
            }
        }
    }

    let text = std::fs::read_to_string(&fleet.file)
        .with_context(|| format!("reading {}", fleet.file.display()))?;
    let image = vm_image(fleet, &text, name, image)?;
    let edited = add_vm(
        &text,
        name.as_str(),
        image.as_deref(),
        true,
        ssh_port,
        spice_port,
    )?;
    // The edited file must still be a valid fleet file before anything is written.
    Fleet::parse(&fleet.file, &edited)?;

    let mut written = Written::default();
    let result = (|| {
        let dir = host_config.parent().context("host config folder")?;
        written.create_dir(dir)?;
        written.write(&host_config, &host_text)?;
        for extra in &extras {
            written.write(&extra.path, &extra.text)?;
        }
        crate::fsutil::write_atomic_keep_mode(&fleet.file, edited.as_bytes(), 0o644)
    })();
    if let Err(e) = result {
        return Err(written.undo(e));
    }
    let path_of = |kind| {
        extras
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.path.clone())
    };
    Ok(Scaffolded {
        name: name.to_string(),
        host_config: Some(host_config),
        home_manager: path_of(Extra::HomeManager),
        user_module: path_of(Extra::UserModule),
        user_module_imported,
        wire_by_hand,
        ssh_port,
        spice_port,
    })
}

/// A project without a NixOS layout (no host template): only `[vms.NAME]`,
/// without `nixos`; nothing else is invented.
fn vm_only(
    fleet: &Fleet,
    name: &Name,
    image: Option<&str>,
    ssh_port: u16,
    spice_port: u16,
) -> Result<Scaffolded> {
    let text = std::fs::read_to_string(&fleet.file)
        .with_context(|| format!("reading {}", fleet.file.display()))?;
    let image = vm_image(fleet, &text, name, image)?;
    let edited = add_vm(
        &text,
        name.as_str(),
        image.as_deref(),
        false,
        ssh_port,
        spice_port,
    )?;
    Fleet::parse(&fleet.file, &edited)?;
    crate::fsutil::write_atomic_keep_mode(&fleet.file, edited.as_bytes(), 0o644)?;
    Ok(Scaffolded {
        name: name.to_string(),
        host_config: None,
        home_manager: None,
        user_module: None,
        user_module_imported: false,
        wire_by_hand: vec![format!(
            "this project has no {TEMPLATE}, so vms.{name} has no NixOS host config (deploy skips nixos-rebuild); \
             to manage it with NixOS, copy hosts/ and flake.nix from agentvm's repository, add `nixos = \".#agent-{name}\"` to [vms.{name}], and run agentvm new for the next agent"
        )],
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
        let edited = add_vm(FLEET, "luce", None, true, 2301, 5901).unwrap();
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
        let err = add_vm(FLEET, "drago", None, true, 2301, 5901)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
    }

    #[test]
    fn a_file_without_vms_gets_a_vms_table() {
        let edited = add_vm("[defaults]\ncpus = 2\n", "a", None, true, 2222, 5900).unwrap();
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

#[cfg(test)]
mod project_tests {
    use super::*;

    const HOST_TEMPLATE: &str = "# @NAME@\n{ pkgs, ... }:\n\n{\n  imports = [ ../agent-base ];\n\n  networking.hostName = \"@NAME@\";\n  agentvm.user = \"@NAME@\";\n}\n";
    const FLEET: &str = "# mine\n[images.base]\nfile = \"/b.qcow2\"\n";

    /// A project folder with the host template, the fleet file and `dirs`.
    fn project(dirs: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join(TEMPLATE);
        std::fs::create_dir_all(template.parent().unwrap()).unwrap();
        std::fs::write(&template, HOST_TEMPLATE).unwrap();
        std::fs::write(dir.path().join("agentvm.toml"), FLEET).unwrap();
        for d in dirs {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
            std::fs::write(dir.path().join(d).join("other.nix"), "{ }\n").unwrap();
        }
        dir
    }

    fn run(dir: &Path, name: &str) -> Result<Scaffolded> {
        let file = dir.join("agentvm.toml");
        let fleet = Fleet::parse(&file, &std::fs::read_to_string(&file).unwrap()).unwrap();
        scaffold(&fleet, &Name::new(name).unwrap(), None, 2301, 5901)
    }

    #[test]
    fn the_shipped_template_takes_the_user_module_beside_its_hardware_config() {
        let template = include_str!("../hosts/agent-template/default.nix");
        let edited = add_import(template, "../../users/agent-luce.nix").unwrap();
        assert!(
            edited.contains("imports = [ ../agent-base ../../users/agent-luce.nix ]\n    ++ lib.optional (builtins.pathExists ./hardware-configuration.nix)"),
            "{edited}"
        );
    }

    #[test]
    fn without_a_host_template_only_the_vm_is_added_and_without_nixos() {
        let dir = project(&["users"]);
        std::fs::remove_file(dir.path().join(TEMPLATE)).unwrap();
        let made = run(dir.path(), "luce").unwrap();
        assert!(made.host_config.is_none() && made.user_module.is_none());
        assert!(
            made.wire_by_hand[0].contains(TEMPLATE),
            "{:?}",
            made.wire_by_hand
        );
        let text = std::fs::read_to_string(dir.path().join("agentvm.toml")).unwrap();
        let fleet = Fleet::parse(&dir.path().join("agentvm.toml"), &text).unwrap();
        let luce = fleet.vm("luce").unwrap();
        assert_eq!((luce.nixos.clone(), luce.ssh_port), (None, Some(2301)));
        assert!(!dir.path().join("hosts/agent-luce").exists());
        assert!(!dir.path().join("users/agent-luce.nix").exists());
    }

    /// `nix-instantiate --parse` accepts the file, when it is installed.
    fn parses(path: &Path) {
        // The dummy store: a user without a Nix profile folder can parse too.
        match std::process::Command::new("nix-instantiate")
            .args(["--store", "dummy://", "--parse"])
            .arg(path)
            .output()
        {
            Ok(out) => assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("running nix-instantiate: {e}"),
        }
    }

    /// Every file under `dir`, with its text.
    fn tree(dir: &Path) -> Vec<(PathBuf, String)> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(tree(&path));
            } else {
                let text = std::fs::read_to_string(&path).unwrap();
                files.push((path, text));
            }
        }
        files.sort();
        files
    }

    #[test]
    fn imports_are_added_keeping_the_lists_layout() {
        let one = "{\n  imports = [ ../agent-base ];\n}\n";
        assert_eq!(
            add_import(one, "../../users/agent-x.nix").unwrap(),
            "{\n  imports = [ ../agent-base ../../users/agent-x.nix ];\n}\n"
        );
        assert_eq!(
            add_import("{ imports = []; }", "./a.nix").unwrap(),
            "{ imports = [ ./a.nix ]; }"
        );
        assert_eq!(
            add_import("{ imports=[./b.nix]; }", "./a.nix").unwrap(),
            "{ imports=[./b.nix ./a.nix]; }"
        );
        let lines = "{\n  # imports = [ ./not-this ];\n  x = \"imports = [ no ]\";\n  imports = [\n    ../agent-base\n    (modulesPath + \"/a]b.nix\") # ] too\n  ];\n}\n";
        assert_eq!(
            add_import(lines, "../../users/agent-x.nix").unwrap(),
            "{\n  # imports = [ ./not-this ];\n  x = \"imports = [ no ]\";\n  imports = [\n    ../agent-base\n    (modulesPath + \"/a]b.nix\") # ] too\n    ../../users/agent-x.nix\n  ];\n}\n"
        );
        assert_eq!(
            add_import("{\n  imports = [\n    ./b.nix ];\n}", "./a.nix").unwrap(),
            "{\n  imports = [\n    ./b.nix ./a.nix ];\n}"
        );
        assert_eq!(add_import("{ myimports = [ ]; }", "./a.nix"), None);
        assert_eq!(add_import("{ x = 1; }", "./a.nix"), None);
    }

    #[test]
    fn a_project_with_home_and_users_folders_gets_both_files() {
        let dir = project(&["home", "users", "modules/users"]);
        let made = run(dir.path(), "luce").unwrap();
        let home = dir.path().join("home/agent-luce.nix");
        let user = dir.path().join("users/agent-luce.nix");
        assert_eq!(made.home_manager.as_deref(), Some(home.as_path()));
        assert_eq!(made.user_module.as_deref(), Some(user.as_path()));
        assert!(made.user_module_imported);
        assert!(!dir.path().join("modules/users/agent-luce.nix").exists());

        let home_text = std::fs::read_to_string(&home).unwrap();
        assert!(
            home_text
                .starts_with("# luce's home-manager configuration, made by `agentvm new luce`.")
                && home_text.contains("home.username = \"luce\";")
                && home_text.contains("home.homeDirectory = \"/home/luce\";")
                && home_text.contains("home.stateVersion = ")
                && !home_text.contains(PLACEHOLDER),
            "{home_text}"
        );
        let user_text = std::fs::read_to_string(&user).unwrap();
        assert!(
            user_text.starts_with("# luce's account, made by `agentvm new luce`")
                && user_text.contains("users.users.luce = {")
                && user_text.contains("isNormalUser = lib.mkDefault true;"),
            "{user_text}"
        );
        let host = std::fs::read_to_string(made.host_config.as_ref().unwrap()).unwrap();
        assert!(
            host.contains("imports = [ ../agent-base ../../users/agent-luce.nix ];"),
            "{host}"
        );
        // The home-manager file is not imported, but said where to wire.
        assert!(!host.contains("home/agent-luce.nix"), "{host}");
        assert_eq!(made.wire_by_hand.len(), 1, "{:?}", made.wire_by_hand);
        assert!(
            made.wire_by_hand[0].contains("home/agent-luce.nix")
                && made.wire_by_hand[0]
                    .contains("home-manager.users.luce = import ../../home/agent-luce.nix;"),
            "{:?}",
            made.wire_by_hand
        );
        let fleet = std::fs::read_to_string(dir.path().join("agentvm.toml")).unwrap();
        assert!(
            fleet.starts_with(FLEET) && fleet.contains("[vms.luce]"),
            "{fleet}"
        );
        for path in [&home, &user, made.host_config.as_ref().unwrap()] {
            parses(path);
        }
        let json = serde_json::to_value(&made).unwrap();
        assert_eq!(json["user_module"], user.display().to_string());
        assert_eq!(json["home_manager"], home.display().to_string());
    }

    #[test]
    fn a_folders_agent_template_is_copied_with_the_name_filled_in() {
        let dir = project(&["home-manager", "modules/users"]);
        std::fs::write(
            dir.path().join("home-manager/agent-template.nix"),
            "{ ... }: { home.username = \"@NAME@\"; programs.git.enable = true; }\n",
        )
        .unwrap();
        let made = run(dir.path(), "drago").unwrap();
        let home = dir.path().join("home-manager/agent-drago.nix");
        assert_eq!(made.home_manager.as_deref(), Some(home.as_path()));
        assert_eq!(
            std::fs::read_to_string(&home).unwrap(),
            "# Made by `agentvm new drago` from home-manager/agent-template.nix.\n\
             { ... }: { home.username = \"drago\"; programs.git.enable = true; }\n"
        );
        // The user module folder has no template: the default, imported.
        let user = dir.path().join("modules/users/agent-drago.nix");
        assert_eq!(made.user_module.as_deref(), Some(user.as_path()));
        let host = std::fs::read_to_string(made.host_config.as_ref().unwrap()).unwrap();
        assert!(
            host.contains("../../modules/users/agent-drago.nix ];"),
            "{host}"
        );
        for path in [&home, &user, made.host_config.as_ref().unwrap()] {
            parses(path);
        }
    }

    #[test]
    fn a_project_without_such_folders_gets_only_the_host_and_the_vm() {
        let dir = project(&["modules"]);
        // Folders with those names but no Nix files are no such layout.
        std::fs::create_dir_all(dir.path().join("home/alice")).unwrap();
        std::fs::create_dir_all(dir.path().join("home-manager")).unwrap();
        std::fs::write(dir.path().join("home-manager/notes.txt"), "").unwrap();
        std::fs::create_dir_all(dir.path().join("users")).unwrap();
        let made = run(dir.path(), "solo").unwrap();
        assert_eq!(made.home_manager, None);
        assert_eq!(made.user_module, None);
        assert!(!made.user_module_imported && made.wire_by_hand.is_empty());
        assert_eq!(
            std::fs::read_to_string(made.host_config.as_ref().unwrap()).unwrap(),
            HOST_TEMPLATE.replace(PLACEHOLDER, "solo")
        );
        let names: Vec<PathBuf> = tree(dir.path())
            .into_iter()
            .map(|(p, _)| p.strip_prefix(dir.path()).unwrap().to_path_buf())
            .collect();
        assert_eq!(
            names,
            [
                "agentvm.toml",
                "home-manager/notes.txt",
                "hosts/agent-solo/default.nix",
                "hosts/agent-template/default.nix",
                "modules/other.nix",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn a_host_template_without_imports_leaves_the_user_module_to_wire() {
        let dir = project(&["users"]);
        std::fs::write(
            dir.path().join(TEMPLATE),
            "{ networking.hostName = \"@NAME@\"; }\n",
        )
        .unwrap();
        let made = run(dir.path(), "x").unwrap();
        assert!(made.user_module.is_some() && !made.user_module_imported);
        assert!(
            made.wire_by_hand.len() == 1
                && made.wire_by_hand[0].starts_with(
                    "add ../../users/agent-x.nix to the imports of hosts/agent-x/default.nix"
                ),
            "{:?}",
            made.wire_by_hand
        );
    }

    #[test]
    fn an_existing_file_fails_the_run_before_anything_is_written() {
        let dir = project(&["home", "users"]);
        let existing = dir.path().join("users/agent-luce.nix");
        std::fs::write(&existing, "{ }\n").unwrap();
        let before = tree(dir.path());
        let err = format!("{:#}", run(dir.path(), "luce").unwrap_err());
        assert!(
            err.contains(&format!("{} already exists", existing.display())),
            "{err}"
        );
        assert_eq!(tree(dir.path()), before);
        assert!(!dir.path().join("hosts/agent-luce").exists());
    }

    #[test]
    fn undo_removes_the_files_and_only_the_folders_it_made() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("hosts")).unwrap();
        std::fs::write(dir.path().join("hosts/keep.nix"), "{ }").unwrap();
        let mut written = Written::default();
        written
            .create_dir(&dir.path().join("hosts/agent-a/sub"))
            .unwrap();
        written
            .write(&dir.path().join("hosts/agent-a/sub/default.nix"), "{ }")
            .unwrap();
        written
            .write(&dir.path().join("hosts/a.nix"), "{ }")
            .unwrap();
        let err = written.undo(anyhow::anyhow!("the fleet file"));
        assert_eq!(format!("{err:#}"), "the fleet file");
        let left: Vec<PathBuf> = tree(dir.path()).into_iter().map(|(p, _)| p).collect();
        assert_eq!(left, [dir.path().join("hosts/keep.nix")]);
        assert!(!dir.path().join("hosts/agent-a").exists());
    }

    #[test]
    fn a_failed_write_removes_what_the_run_wrote() {
        use std::os::unix::fs::PermissionsExt;
        let dir = project(&["home", "users"]);
        // The fleet file's folder takes no new file (its temp file), so the
        // last write fails after the others.
        let before = tree(dir.path());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        let writable = std::fs::write(dir.path().join("probe"), "").is_ok();
        let result = run(dir.path(), "luce");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        if writable {
            // Running as root: permissions do not stop it.
            return;
        }
        assert!(result.is_err());
        assert_eq!(tree(dir.path()), before);
        assert!(!dir.path().join("hosts/agent-luce").exists());
    }
}
