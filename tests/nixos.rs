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
fn a_missing_nix_is_a_clear_error() {
    let env = Env::new();
    env.write_raw_fleet("[images.base]\nflake = \"github:someone/agents#base\"\n");
    let _daemon = env.spawn_daemon(&[("AGENTVM_NIX", "/nonexistent/nix")]);
    let err = env.fails(&["image", "build", "base"]);
    assert!(err.contains("`/nonexistent/nix` is not installed"), "{err}");
}
