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
    let template = include_str!("../../hosts/agent-template/default.nix");
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
        home_text.starts_with("# luce's home-manager configuration, made by `agentvm new luce`.")
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
