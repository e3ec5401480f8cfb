//! NixOS side: flake image builds, scaffolding, provisioning, secrets.
//!
//! The image build tests use a stand-in `nix` (a script that records its
//! arguments and writes a qcow2): they test agentvm's orchestration of the build
//! (arguments, skipping unchanged flakes, importing the result), not Nix itself.

mod common;

use std::path::{Path, PathBuf};

use common::Env;
use serde_json::Value;

/// A stand-in `nix` that logs its arguments and "builds" a small qcow2.
fn stand_in_nix(env: &Env) -> (PathBuf, PathBuf) {
    let bin = env.dir.path().join("stand-in-nix");
    let log = env.dir.path().join("nix-calls.log");
    let store = env.dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(
        &bin,
        format!(
            "#!/bin/sh\n\
             echo \"$@\" >> {log}\n\
             out={store}/$(date +%s%N)-agent-base-image\n\
             mkdir -p \"$out\"\n\
             echo \"building '/nix/store/0000-agent-base-image.drv'...\" >&2\n\
             qemu-img create -q -f qcow2 \"$out/nixos.qcow2\" 64M\n\
             echo \"$out\"\n",
            log = log.display(),
            store = store.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (bin, log)
}

fn calls(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn build(env: &Env, nix: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["image", "build", "base", "--json"];
    args.extend_from_slice(extra);
    let out = env.command(&args).env("AGENTVM_NIX", nix).output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.daemon_log()
    );
    serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].clone()
}

#[test]
fn flake_images_are_built_once_per_lock_file_and_imported() {
    let env = Env::new();
    let (nix, log) = stand_in_nix(&env);
    let flake = env.dir.path().join("flake");
    std::fs::create_dir_all(&flake).unwrap();
    std::fs::write(flake.join("flake.lock"), "{\"version\": 7}").unwrap();
    env.write_raw_fleet(
        "[images.base]\nflake = \"./flake#agent-base-image\"\n\n[vms.n-flake]\nimage = \"base\"\nmemory = \"256MiB\"\ncpus = 1\n",
    );
    env.owns(&["n-flake"]);
    // The daemon runs nix: start it with the stand-in.
    let _daemon = env.spawn_daemon(&[("AGENTVM_NIX", nix.to_str().unwrap())]);

    let first = build(&env, &nix, &[]);
    assert_eq!(first["built"], true, "{first}");
    let calls1 = calls(&log);
    assert_eq!(calls1.len(), 1);
    let flake_dir = flake.canonicalize().unwrap();
    assert!(
        calls1[0].ends_with(&format!(
            "build --no-link --print-out-paths {}#agent-base-image",
            flake_dir.display()
        )),
        "{calls1:?}"
    );
    assert!(first["digest"].as_str().unwrap().starts_with("sha256:"));

    let again = build(&env, &nix, &[]);
    assert_eq!(again["built"], false, "unchanged flake: {again}");
    assert_eq!(again["digest"], first["digest"]);
    assert_eq!(calls(&log).len(), 1, "nix not run again");

    std::fs::write(flake.join("flake.lock"), "{\"version\": 8}").unwrap();
    assert_eq!(build(&env, &nix, &[])["built"], true, "lock changed");
    assert_eq!(
        build(&env, &nix, &["--rebuild"])["built"],
        true,
        "--rebuild"
    );
    assert_eq!(calls(&log).len(), 3);

    // up uses the built image without building again.
    env.ok(&["up", "n-flake", "--no-wait"]);
    assert_eq!(calls(&log).len(), 3);
    assert!(env.home().join("vms/n-flake/disk.qcow2").is_file());
}

#[test]
fn nix_files_and_the_files_they_name_decide_a_rebuild_and_the_readme_does_not() {
    let env = Env::new();
    let (nix, log) = stand_in_nix(&env);
    let flake = env.dir.path().join("flake");
    let write = |file: &str, text: &str| {
        let path = flake.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("flake.lock", "{\"version\": 7}");
    write(
        "flake.nix",
        "{\n  outputs = { self, nixpkgs }: {\n    packages.x86_64-linux.agent-base-image =\n      (nixpkgs.lib.nixosSystem { modules = [ ./hosts/agent-base ]; }).config.system.build.image;\n  };\n}\n",
    );
    write(
        "hosts/agent-base/default.nix",
        "{ ... }: {\n  imports = [ ../common/base.nix ];\n  networking.hostName = \"base\";\n}\n",
    );
    write(
        "hosts/common/base.nix",
        "{ ... }: {\n  users.motd = builtins.readFile ../../files/motd.txt;\n}\n",
    );
    write("files/motd.txt", "welcome\n");
    write("README.md", "# agents\n");
    env.write_raw_fleet("[images.base]\nflake = \"./flake#agent-base-image\"\n");
    let _daemon = env.spawn_daemon(&[("AGENTVM_NIX", nix.to_str().unwrap())]);

    assert_eq!(build(&env, &nix, &[])["built"], true, "first build");
    for (file, text, rebuilds) in [
        ("README.md", "# agents, documented\n", false),
        (
            "hosts/agent-base/default.nix",
            "{ ... }: {\n  imports = [ ../common/base.nix ];\n  networking.hostName = \"base2\";\n}\n",
            true,
        ),
        ("files/motd.txt", "welcome back\n", true),
        ("notes.txt", "not named by any .nix file\n", false),
        ("hosts/common/extra.nix", "{ }\n", true),
    ] {
        let before = calls(&log).len();
        write(file, text);
        let built = build(&env, &nix, &[]);
        assert_eq!(built["built"], rebuilds, "after editing {file}: {built}");
        assert_eq!(
            calls(&log).len(),
            before + usize::from(rebuilds),
            "nix runs after editing {file}: {rebuilds}"
        );
    }
}

#[test]
fn a_corrupt_build_record_is_an_error_and_left_as_it_is() {
    let env = Env::new();
    let (nix, log) = stand_in_nix(&env);
    let flake = env.dir.path().join("flake");
    std::fs::create_dir_all(&flake).unwrap();
    std::fs::write(flake.join("flake.lock"), "{\"version\": 7}").unwrap();
    env.write_raw_fleet("[images.base]\nflake = \"./flake#agent-base-image\"\n");
    let records = env.home().join("images/builds.json");
    std::fs::create_dir_all(records.parent().unwrap()).unwrap();
    let corrupt = b"{\"base\": {\"inputs\": \"sha256:00\", \"output\": }}".to_vec();
    std::fs::write(&records, &corrupt).unwrap();
    let _daemon = env.spawn_daemon(&[("AGENTVM_NIX", nix.to_str().unwrap())]);

    let out = env
        .command(&["image", "build", "base"])
        .env("AGENTVM_NIX", &nix)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&records.display().to_string()) && stderr.contains("line 1 column 44"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&records).unwrap(), corrupt, "left as it was");
    assert!(calls(&log).is_empty(), "nothing built: {:?}", calls(&log));
}

#[test]
fn a_missing_nix_is_a_clear_error() {
    let env = Env::new();
    env.write_raw_fleet("[images.base]\nflake = \"github:someone/agents#base\"\n");
    let _daemon = env.spawn_daemon(&[("AGENTVM_NIX", "/nonexistent/nix")]);
    let err = env.fails(&["image", "build", "base"]);
    assert!(err.contains("`/nonexistent/nix` is not installed"), "{err}");
}

#[test]
fn new_scaffolds_a_host_and_a_vm_keeping_the_fleet_file_as_written() {
    let env = Env::new();
    let template = env.dir.path().join("hosts/agent-template/default.nix");
    std::fs::create_dir_all(template.parent().unwrap()).unwrap();
    std::fs::write(
        &template,
        "# agent @NAME@\n{ networking.hostName = \"@NAME@\"; }\n",
    )
    .unwrap();
    let original = "# my agents\n[defaults]\nimage = \"base\" # shared\n\n[images.base]\nfile = \"base.qcow2\"\n\n# the first one\n[vms.drago]\nssh_port = 2222\n";
    env.write_raw_fleet(original);

    let made = env.json(&["new", "n-scaffold"]);
    let host = env.dir.path().join("hosts/agent-n-scaffold/default.nix");
    assert_eq!(
        std::fs::read_to_string(&host).unwrap(),
        "# agent n-scaffold\n{ networking.hostName = \"n-scaffold\"; }\n"
    );
    let fleet = std::fs::read_to_string(env.fleet_path()).unwrap();
    assert!(
        fleet.starts_with(original),
        "comments and order kept:\n{fleet}"
    );
    // No user-module or home-manager folder (the test's home/ holds no Nix
    // files): no such file.
    assert!(
        made["user_module"].is_null() && made["home_manager"].is_null(),
        "{made}"
    );
    let ssh = made["ssh_port"].as_u64().unwrap();
    assert_ne!(ssh, 2222, "a port pinned by another VM is not reused");
    assert!(
        fleet.contains(&format!(
            "[vms.n-scaffold]\nnixos = \".#agent-n-scaffold\"\nssh_port = {ssh}\nspice_port = {}\n",
            made["spice_port"]
        )),
        "{fleet}"
    );

    // Existing names are refused and nothing changes.
    for existing in ["n-scaffold", "drago"] {
        let err = env.fails(&["new", existing]);
        assert!(err.contains("already exists"), "{err}");
    }
    assert_eq!(std::fs::read_to_string(env.fleet_path()).unwrap(), fleet);
    let err = env.fails(&["new", "Bad_Name"]);
    assert!(err.contains("invalid name"), "{err}");

    // With users/ and home-manager/ folders of Nix files, both files too,
    // each named in the output.
    for dir in ["users", "home-manager"] {
        std::fs::create_dir(env.dir.path().join(dir)).unwrap();
        std::fs::write(env.dir.path().join(dir).join("alice.nix"), "{ }\n").unwrap();
    }
    let out = env.ok(&["new", "n-scaffold2"]);
    for file in [
        "users/agent-n-scaffold2.nix",
        "home-manager/agent-n-scaffold2.nix",
    ] {
        let path = env.dir.path().join(file);
        assert!(path.exists(), "{file}: {out}");
        assert!(
            out.contains(&format!("wrote {}", path.display())),
            "{file}: {out}"
        );
    }
    assert!(
        out.contains("to do: wire home-manager/agent-n-scaffold2.nix"),
        "{out}"
    );
}

#[test]
fn provision_runs_nixos_rebuild_against_the_vm_over_its_ssh_port() {
    let env = Env::new();
    env.write_fleet("[vms.n-prov]\nnixos = \".#agent-n-prov\"\n");
    env.owns(&["n-prov"]);
    env.ok(&["up", "n-prov", "--timeout", common::GUEST_TIMEOUT]);

    let dry = env.ok(&["provision", "n-prov", "--dry-run"]);
    assert!(
        dry.contains("switch --flake")
            && dry.contains("#agent-n-prov --target-host root@agentvm-n-prov"),
        "{dry}"
    );
    // A stand-in nixos-rebuild that does what the real one needs first: reach
    // the target with `ssh $NIX_SSHOPTS`. It tests agentvm's part only.
    let stand_in = env.dir.path().join("nixos-rebuild");
    std::fs::write(
        &stand_in,
        "#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = --target-host ] && target=$2; shift; done\n\
         exec ssh $NIX_SSHOPTS \"$target\" 'echo switched on $(uname -n)'\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &stand_in,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = env
        .command(&["provision", "n-prov"])
        .env("AGENTVM_NIXOS_REBUILD", &stand_in)
        .output()
        .unwrap();
    common::assert_success(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "switched on testguest\n"
    );
}

/// `hosts/common/agent-base.nix` publishes the VM's env with the same script
/// as the Debian test guest, whose boots (tests/debian.rs) check it for
/// real: no NixOS guest boots here. The module is evaluated with stand-ins
/// for nixpkgs, and the scripts compared without comments, indentation,
/// PATH and the owner of the published files (the agent user on NixOS, root
/// on Debian).
#[test]
fn agent_base_publishes_the_env_with_the_debian_guests_script() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let expr = format!(
        r#"let
  module = import (/. + "{module}");
  pkgs = {{
    writeShellScript = name: text: text;
    coreutils = "/coreutils"; gnused = "/gnused"; gnugrep = "/gnugrep";
    diffutils = "/diffutils"; util-linux = "/util-linux";
  }};
  lib = {{
    makeBinPath = l: builtins.concatStringsSep ":" (map (p: p + "/bin") l);
    mkOption = x: x; mkEnableOption = x: x; mkMerge = x: x; mkIf = c: x: x; mkDefault = x: x;
    types = {{ str = null; listOf = x: null; }};
  }};
  config = {{
    agentvm = {{ user = "agent"; desktop.enable = false; tailscale.enable = false; }};
    users.users.agent = {{ home = "/home/agent"; group = "users"; }};
    systemd.package = "/systemd";
  }};
  c = builtins.head (module {{ inherit config lib pkgs; modulesPath = "/modules"; }}).config;
in {{
  inherit (c.systemd.services.agentvm-env.serviceConfig) ExecStart ImportCredential;
  update = c.systemd.services.agentvm-env-update;
  path = c.systemd.paths.agentvm-env;
  tmpfiles = c.systemd.tmpfiles.rules;
  userAfter = c.systemd.services."user@".after;
}}"#,
        module = root.join("hosts/common/agent-base.nix").display()
    );
    let out = std::process::Command::new("nix-instantiate")
        .args([
            "--store", "dummy://", "--eval", "--strict", "--json", "--expr",
        ])
        .arg(&expr)
        .output()
        .expect("nix-instantiate (nix-bin) is needed by this test");
    common::assert_success(&out);
    let nixos: Value = serde_json::from_slice(&out.stdout).unwrap();
    let script = nixos["ExecStart"].as_str().unwrap();

    // The same commands in the same order.
    let commands = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter(|l| !l.starts_with("export PATH=") && !l.starts_with("chown "))
            .map(|l| {
                l.strip_prefix("install -d -m 0700 ")
                    .or_else(|| l.strip_prefix("install -d -m 0755 "))
                    .map_or(l.to_string(), |rest| format!("install -d {rest}"))
            })
            .collect()
    };
    let debian_dir = root.join("images/debian/rootfs/common");
    let debian =
        std::fs::read_to_string(debian_dir.join("usr/local/lib/agentvm/publish-env")).unwrap();
    assert_eq!(commands(script), commands(&debian));
    // NixOS gives both published files to the agent user.
    assert_eq!(
        script
            .lines()
            .filter(|l| l.trim().starts_with("chown agent "))
            .count(),
        2,
        "{script}"
    );
    let path = script
        .lines()
        .find_map(|l| l.trim().strip_prefix("export PATH="))
        .unwrap();
    for tool in [
        "coreutils",
        "gnused",
        "gnugrep",
        "diffutils",
        "util-linux",
        "systemd",
    ] {
        assert!(path.contains(&format!("/{tool}/bin")), "{path}");
    }

    // The same units: at boot, and again when /etc/agentvm/env changes.
    assert_eq!(nixos["ImportCredential"], "agentvm.env");
    let update = &nixos["update"];
    assert_eq!(
        update["serviceConfig"]["ExecStart"],
        format!("{script} --changed")
    );
    assert_eq!(update["serviceConfig"]["Type"], "oneshot");
    assert_eq!(update["serviceConfig"]["ImportCredential"], "agentvm.env");
    assert_eq!(update["after"], serde_json::json!(["agentvm-env.service"]));
    assert_eq!(
        nixos["path"]["pathConfig"]["PathChanged"],
        "/etc/agentvm/env"
    );
    assert_eq!(
        nixos["path"]["pathConfig"]["Unit"],
        "agentvm-env-update.service"
    );
    assert_eq!(
        nixos["path"]["wantedBy"],
        serde_json::json!(["paths.target"])
    );
    assert!(
        nixos["tmpfiles"]
            .as_array()
            .unwrap()
            .contains(&"d /etc/agentvm 0700 root root -".into()),
        "{nixos}"
    );
    assert_eq!(
        nixos["userAfter"],
        serde_json::json!(["agentvm-env.service"])
    );

    let unit = |name: &str| {
        std::fs::read_to_string(debian_dir.join("etc/systemd/system").join(name)).unwrap()
    };
    let path_unit = unit("agentvm-env.path");
    assert!(
        path_unit.contains("\nPathChanged=/etc/agentvm/env\n")
            && path_unit.contains("\nUnit=agentvm-env-update.service\n")
            && path_unit.contains("\nWantedBy=paths.target\n"),
        "{path_unit}"
    );
    let update_unit = unit("agentvm-env-update.service");
    assert!(
        update_unit.contains("\nExecStart=/usr/local/lib/agentvm/publish-env --changed\n")
            && update_unit.contains("\nAfter=agentvm-env.service\n")
            && !update_unit.contains("\nRemainAfterExit="),
        "{update_unit}"
    );
    assert!(
        std::fs::read_to_string(debian_dir.join("etc/tmpfiles.d/agentvm-env.conf"))
            .unwrap()
            .contains("\nd /etc/agentvm 0700 root root -\n")
    );
}

/// The inactive domain XML of `vm`, as libvirt keeps it.
fn defined_xml(vm: &str) -> String {
    let out = std::process::Command::new("virsh")
        .args(["-c", "qemu:///session", "dumpxml", "--inactive"])
        .arg(format!("agentvm-{vm}"))
        .output()
        .unwrap();
    common::assert_success(&out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A NixOS image whose build output names its system's kernel and initrd
/// (`agentvm-boot.json`, as `hosts/agent-base` writes it) boots them
/// directly, without a bootloader; once `provision` switched the VM's system,
/// it boots from its disk. The stand-in build output holds the test guest's
/// kernel, initrd and disk, so the direct boot really reaches SSH.
#[test]
fn a_nixos_image_boots_its_own_kernel_until_provision_changes_its_system() {
    let env = Env::new();
    let guest = common::guest_dir();
    let store = env.dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let nix = env.dir.path().join("stand-in-nix");
    std::fs::write(
        &nix,
        format!(
            "#!/bin/sh\n\
             out={store}/$(date +%s%N)-agentvm-image\n\
             mkdir -p \"$out\"\n\
             cp {guest}/disk.qcow2 \"$out/nixos.qcow2\"\n\
             printf '{{\"kernel\": \"%s\", \"initrd\": \"%s\", \"cmdline\": \"console=ttyS0 quiet\"}}' \
               {guest}/vmlinuz {guest}/initrd.img > \"$out/agentvm-boot.json\"\n\
             echo \"$out\"\n",
            store = store.display(),
            guest = guest.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&nix, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let flake = env.dir.path().join("flake");
    std::fs::create_dir_all(&flake).unwrap();
    std::fs::write(flake.join("flake.lock"), "{\"version\": 7}").unwrap();
    env.write_raw_fleet(
        "[images.base]\nflake = \"./flake#agent-base-image\"\n\n\
         [vms.n-direct]\nimage = \"base\"\nmemory = \"256MiB\"\ncpus = 1\nnixos = \".#agent-n-direct\"\n",
    );
    env.owns(&["n-direct-f", "n-direct"]);
    let _daemon = env.spawn_daemon(&[("AGENTVM_NIX", nix.to_str().unwrap())]);

    env.ok(&["up", "n-direct", "--timeout", common::GUEST_TIMEOUT]);
    let xml = defined_xml("n-direct");
    assert!(
        xml.contains("<kernel>") && xml.contains("<cmdline>console=ttyS0 quiet</cmdline>"),
        "booted directly: {xml}"
    );
    assert!(xml.contains("<agentvm:boot>direct</agentvm:boot>"), "{xml}");

    let stand_in = env.dir.path().join("nixos-rebuild");
    std::fs::write(&stand_in, "#!/bin/sh\necho switched\n").unwrap();
    std::fs::set_permissions(
        &stand_in,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let provision = || {
        let out = env
            .command(&["provision", "n-direct"])
            .env("AGENTVM_NIXOS_REBUILD", &stand_in)
            .output()
            .unwrap();
        common::assert_success(&out);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let said = provision();
    assert!(
        said.contains("boots through its disk's bootloader"),
        "{said}"
    );
    let xml = defined_xml("n-direct");
    assert!(
        !xml.contains("<kernel>") && !xml.contains("<initrd>") && !xml.contains("<cmdline>"),
        "boots from its disk now: {xml}"
    );
    assert!(xml.contains("<agentvm:boot>disk</agentvm:boot>"), "{xml}");
    // Again: nothing left to change, nothing said.
    assert!(!provision().contains("bootloader"));

    // A fork made now carries the running source's direct boot in its saved
    // XML, but its disk holds the changed system: it boots from its disk too.
    env.ok(&[
        "fork",
        "n-direct",
        "n-direct-f",
        "--timeout",
        common::GUEST_TIMEOUT,
    ]);
    let xml = defined_xml("n-direct-f");
    assert!(
        !xml.contains("<kernel>") && xml.contains("<agentvm:boot>disk</agentvm:boot>"),
        "the fork boots from its disk: {xml}"
    );
    env.ok(&["destroy", "--yes", "n-direct-f"]);

    // A redefinition from a changed spec keeps booting from the disk.
    env.ok(&["down", "--force", "n-direct"]);
    env.write_raw_fleet(
        "[images.base]\nflake = \"./flake#agent-base-image\"\n\n\
         [vms.n-direct]\nimage = \"base\"\nmemory = \"320MiB\"\ncpus = 1\nnixos = \".#agent-n-direct\"\n",
    );
    env.ok(&["up", "n-direct", "--no-wait"]);
    let xml = defined_xml("n-direct");
    assert!(
        xml.contains("327680") || xml.contains("320"),
        "redefined: {xml}"
    );
    assert!(!xml.contains("<kernel>"), "still from its disk: {xml}");
}
