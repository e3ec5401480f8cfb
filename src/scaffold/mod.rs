//! `agentvm new NAME`: a host config from the template and a `[vms.NAME]` table,
//! added to `agentvm.toml` with its comments and order kept, plus a user
//! module and a home-manager file where the project has folders for them
//! (none invented where it has not).

mod fleet_entry;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub use fleet_entry::add_vm;
use fleet_entry::fleet_with_vm;
#[cfg(test)]
use fleet_entry::vm_image;

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

    let edited = fleet_with_vm(fleet, name, image, true, ssh_port, spice_port)?;

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
    let edited = fleet_with_vm(fleet, name, image, false, ssh_port, spice_port)?;
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
mod project_tests;
#[cfg(test)]
mod tests;
