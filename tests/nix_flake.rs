//! The flake's host discovery and daemon modules, evaluated with plain
//! `nix-instantiate` and no network: `hosts/discover.nix` uses builtins only,
//! and `flake.nix`'s outputs are evaluated with a stand-in for nixpkgs, so
//! nothing is fetched or built.
//!
//! Skipped, with the reason printed, when `nix-instantiate` is not installed.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Whether `nix-instantiate` runs; prints why the test is skipped if not.
fn have_nix(test: &str) -> bool {
    match Command::new("nix-instantiate").arg("--version").output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => panic!(
            "nix-instantiate --version failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("{test}: skipped: nix-instantiate is not installed (nix-bin)");
            false
        }
        Err(e) => panic!("running nix-instantiate: {e}"),
    }
}

/// A Nix path expression for `path` (absolute).
fn nix_path(path: &Path) -> String {
    let text = path.to_str().expect("a UTF-8 path");
    assert!(path.is_absolute() && !text.contains("${"), "{text}");
    format!("(/. + {})", serde_json::to_string(text).unwrap())
}

/// Evaluates `expr` strictly, without a store, and returns its JSON.
fn eval(expr: &str) -> Value {
    let out = Command::new("nix-instantiate")
        .args([
            "--store", "dummy://", "--eval", "--strict", "--json", "--expr",
        ])
        .arg(expr)
        .output()
        .expect("running nix-instantiate");
    assert!(
        out.status.success(),
        "nix-instantiate failed on\n{expr}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What `hosts/discover.nix` finds in `hosts`.
fn discover(hosts: &Path) -> Value {
    eval(&format!(
        "import {} {}",
        nix_path(&repo().join("hosts/discover.nix")),
        nix_path(hosts)
    ))
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn discovery_finds_the_agent_folders_and_a_new_one() {
    if !have_nix("discovery_finds_the_agent_folders_and_a_new_one") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    write(&hosts.join("agent-b/default.nix"), "{ }\n");
    write(&hosts.join("agent-a/default.nix"), "{ }\n");
    // Not hosts: a plain file, the shared modules, the template `agentvm new`
    // copies, a folder named only `agent-`, another folder, a symlink.
    write(&hosts.join("agent-file.nix"), "{ }\n");
    write(&hosts.join("common/agent-base.nix"), "{ }\n");
    write(
        &hosts.join("agent-template/default.nix"),
        &std::fs::read_to_string(repo().join(agentvm::scaffold::TEMPLATE)).unwrap(),
    );
    std::fs::create_dir_all(hosts.join("agent-")).unwrap();
    write(&hosts.join("other/default.nix"), "{ }\n");
    std::os::unix::fs::symlink("agent-a", hosts.join("agent-link")).unwrap();

    assert_eq!(discover(&hosts), json!(["agent-a", "agent-b"]));

    // The folder `agentvm new zed` writes is all a new host needs.
    let new_host = agentvm::scaffold::host_config_path(&dir.path().join("agentvm.toml"), "zed");
    assert_eq!(new_host, hosts.join("agent-zed/default.nix"));
    write(&new_host, "{ }\n");
    assert_eq!(discover(&hosts), json!(["agent-a", "agent-b", "agent-zed"]));

    // Gone again when the folder is.
    std::fs::remove_dir_all(hosts.join("agent-a")).unwrap();
    assert_eq!(discover(&hosts), json!(["agent-b", "agent-zed"]));
}

/// The `flake.nix` in `dir` evaluated with a stand-in for nixpkgs: only what
/// its host list and daemon modules need.
fn flake_outputs(dir: &Path, select: &str) -> Value {
    eval(&format!(
        r#"let
  flake = import {flake};
  lib = {{
    genAttrs = names: f: builtins.listToAttrs (map (name: {{ inherit name; value = f name; }}) names);
    nixosSystem = args: args // {{ config.system.build.agentvmImage = "image"; }};
    mapAttrs' = f: set: builtins.listToAttrs (map (n: f n set.${{n}}) (builtins.attrNames set));
    nameValuePair = name: value: {{ inherit name value; }};
    mkOption = x: x; mkEnableOption = x: x; mkIf = c: x: x; literalExpression = x: x;
    types.package = null;
    makeBinPath = l: builtins.concatStringsSep ":" (map (p: p + "/bin") l);
    fileset = {{ toSource = x: x; unions = l: l; }};
  }};
  pkgs = {{
    stdenv.hostPlatform.system = "x86_64-linux";
    rustPlatform.buildRustPackage = x: x;
    pkg-config = "/pkg-config"; libvirt = "/libvirt";
    nix = "/pkgs-nix"; qemu = "/qemu"; openssh = "/openssh";
    passt = "/passt"; virtiofsd = "/virtiofsd";
  }};
  nixpkgs = {{ inherit lib; legacyPackages.x86_64-linux = pkgs; }};
  self = flake.outputs {{ inherit self nixpkgs; }};
  enabled = {{ enable = true; package = "/agentvm"; }};
in {select}"#,
        flake = nix_path(&dir.join("flake.nix")),
    ))
}

#[test]
fn the_flake_has_one_configuration_and_image_per_host_folder() {
    if !have_nix("the_flake_has_one_configuration_and_image_per_host_folder") {
        return;
    }
    let hosts_dir = repo().join("hosts");
    let mut on_disk: Vec<String> = std::fs::read_dir(&hosts_dir)
        .unwrap()
        .map(Result::unwrap)
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n.len() > "agent-".len() && n.starts_with("agent-") && n != "agent-template")
        .collect();
    on_disk.sort();
    for example in ["agent-base", "agent-drago", "agent-luce"] {
        assert!(on_disk.iter().any(|n| n == example), "{on_disk:?}");
    }
    assert_eq!(discover(&hosts_dir), json!(on_disk));

    let out = flake_outputs(
        repo(),
        r#"{
  hosts = builtins.attrNames self.nixosConfigurations;
  modules = builtins.mapAttrs (_: c: map toString c.modules) self.nixosConfigurations;
  packages = builtins.attrNames self.packages.x86_64-linux;
  src = map toString self.packages.x86_64-linux.agentvm.src.fileset;
  inputs = builtins.attrNames (flake.inputs or { });
  nixpkgsUrl = flake.inputs.nixpkgs.url;
}"#,
    );
    assert_eq!(out["hosts"], json!(on_disk));
    for host in &on_disk {
        assert_eq!(
            out["modules"][host],
            json!([hosts_dir.join(host).to_str().unwrap()]),
            "{out}"
        );
        assert!(
            out["packages"]
                .as_array()
                .unwrap()
                .contains(&json!(format!("{host}-image"))),
            "{out}"
        );
    }
    assert!(
        out["packages"]
            .as_array()
            .unwrap()
            .contains(&json!("default"))
    );
    // Built from the one stable nixpkgs, from its sources only.
    assert_eq!(out["inputs"], json!(["nixpkgs"]));
    assert!(
        out["nixpkgsUrl"]
            .as_str()
            .unwrap()
            .starts_with("github:NixOS/nixpkgs/nixos-"),
        "{out}"
    );
    let src: Vec<&str> = out["src"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for needed in ["Cargo.toml", "Cargo.lock", "src", "benches"] {
        assert!(
            src.contains(&repo().join(needed).to_str().unwrap()),
            "{src:?}"
        );
    }
    assert!(!src.iter().any(|p| p.ends_with("/hosts")), "{src:?}");

    // The same flake.nix beside other host folders has those hosts: it
    // discovers them rather than naming them.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo().join("flake.nix"), dir.path().join("flake.nix")).unwrap();
    let hosts = dir.path().join("hosts");
    write(
        &hosts.join("discover.nix"),
        &std::fs::read_to_string(hosts_dir.join("discover.nix")).unwrap(),
    );
    for name in ["agent-one", "agent-two", "agent-template", "common"] {
        write(&hosts.join(name).join("default.nix"), "{ }\n");
    }
    let elsewhere = flake_outputs(dir.path(), "builtins.attrNames self.nixosConfigurations");
    assert_eq!(elsewhere, json!(["agent-one", "agent-two"]));
}

#[test]
fn the_daemon_modules_put_nix_ssh_qemu_and_virtiofsd_on_the_path() {
    if !have_nix("the_daemon_modules_put_nix_ssh_qemu_and_virtiofsd_on_the_path") {
        return;
    }
    let out = flake_outputs(
        repo(),
        r#"{
  nixos = (self.nixosModules.agentvm-daemon {
    inherit lib pkgs;
    config = {
      services.agentvm = enabled;
      nix.package = "/system-nix";
      virtualisation.libvirtd.qemu.package = "/libvirt-qemu";
    };
  }).config.systemd.user.services.agentvm-daemon;
  home = (self.homeManagerModules.agentvm {
    inherit lib pkgs;
    config = { services.agentvm = enabled; nix.package = null; };
  }).config.systemd.user.services.agentvm-daemon;
  homeWithNix = (self.homeManagerModules.agentvm {
    inherit lib pkgs;
    config = { services.agentvm = enabled; nix.package = "/home-nix"; };
  }).config.systemd.user.services.agentvm-daemon.Service.Environment;
}"#,
    );

    let nixos = &out["nixos"];
    assert_eq!(
        nixos["serviceConfig"]["ExecStart"],
        "/agentvm/bin/agentvm daemon --idle-exit off"
    );
    let path: Vec<&str> = nixos["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for tool in ["/system-nix", "/libvirt-qemu", "/openssh", "/virtiofsd"] {
        assert!(path.contains(&tool), "{path:?}");
    }

    let home = &out["home"];
    assert_eq!(
        home["Service"]["ExecStart"],
        "/agentvm/bin/agentvm daemon --idle-exit off"
    );
    assert_eq!(home["Install"]["WantedBy"], json!(["default.target"]));
    let env = home["Service"]["Environment"][0].as_str().unwrap();
    let dirs: Vec<&str> = env.strip_prefix("PATH=").unwrap().split(':').collect();
    for tool in [
        "/pkgs-nix/bin",
        "/qemu/bin",
        "/openssh/bin",
        "/virtiofsd/bin",
    ] {
        assert!(dirs.contains(&tool), "{env}");
    }
    // A nix the user configured wins over nixpkgs' own.
    let with_nix = out["homeWithNix"][0].as_str().unwrap();
    assert!(
        with_nix.contains("/home-nix/bin") && !with_nix.contains("/pkgs-nix/bin"),
        "{with_nix}"
    );
}
