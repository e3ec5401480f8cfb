//! `agentvm cp` against a real Debian guest: files and trees both ways over
//! SSH and through the guest agent, modes kept, scp's destination rules, the
//! errors for a missing source, a folder without -r and a full guest disk,
//! and auto mode falling back to the agent with the guest's network down.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{Env, debian_image};
use serde_json::Value;
use sha2::{Digest, Sha256};

const VM: &str = "deb-cp";
const BIG: usize = 20 << 20;

/// `len` bytes that do not compress (xorshift64).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs a shell command in the guest through the agent (works without its network).
fn guest_sh(env: &Env, script: &str) -> String {
    env.ok(&["exec", VM, "--", "/bin/sh", "-c", script])
}

fn guest_sha256(env: &Env, path: &str) -> String {
    let out = guest_sh(env, &format!("sha256sum {path}"));
    out.split_whitespace().next().unwrap().to_string()
}

/// `cp --json ARGS`, checked to be one copy in `direction` via `via`.
fn copy(env: &Env, args: &[&str], direction: &str, via: &str) -> Value {
    let mut full = vec!["cp"];
    full.extend_from_slice(args);
    let out = env.json(&full);
    assert_eq!(out["vm"], VM, "{out}");
    assert_eq!(out["direction"], direction, "{out}");
    assert_eq!(out["via"], via, "{out}");
    out
}

fn mib_per_s(out: &Value) -> f64 {
    out["bytes"].as_f64().unwrap() / f64::from(1 << 20) / out["seconds"].as_f64().unwrap()
}

/// Every entry under `root` as `relative-path mode [sha256]`, sorted.
fn host_tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() {
                out.push(format!("{rel} {:o}", mode_of(&path)));
                walk(root, &path, out);
            } else {
                out.push(format!("{rel} {:o} {}", mode_of(&path), sha256_file(&path)));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// The same listing of a guest tree, through the agent.
fn guest_tree(env: &Env, root: &str) -> Vec<String> {
    let script = format!(
        "cd {root} && find . -mindepth 1 | while read -r p; do r=${{p#./}}; if [ -d \"$p\" ]; then echo \"$r $(stat -c %a \"$p\")\"; else echo \"$r $(stat -c %a \"$p\") $(sha256sum < \"$p\" | cut -d' ' -f1)\"; fi; done"
    );
    let mut lines: Vec<String> = guest_sh(env, &script).lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// A small tree: nested folders, an executable script, a private file.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::write(root.join("a/b/run.sh"), "#!/bin/sh\necho ran-from-tree\n").unwrap();
    set_mode(&root.join("a/b/run.sh"), 0o755);
    std::fs::write(root.join("a/secret"), random_bytes(70_000, 7)).unwrap();
    set_mode(&root.join("a/secret"), 0o600);
    std::fs::write(root.join("top name.txt"), "spaces too\n").unwrap();
    set_mode(&root.join("a"), 0o750);
}

#[test]
fn cp_copies_files_and_trees_both_ways_over_ssh_and_the_agent() {
    let env = Env::new();
    let image = debian_image("plain");
    env.write_raw_fleet(&format!(
        "[defaults]\ncpus = 2\nmemory = \"1GiB\"\n\n[images.debian]\nfile = {:?}\n\n[vms.{VM}]\nimage = \"debian\"\ndisk = \"4GiB\"\n",
        image.display().to_string()
    ));
    env.owns(&[VM]);
    env.ok(&["up", VM, "--timeout", "600"]);
    guest_sh(&env, "mkdir -p /srv/cp");
    let host = env.dir.path().join("host");
    std::fs::create_dir_all(&host).unwrap();
    let big = host.join("big.bin");
    std::fs::write(&big, random_bytes(BIG, 42)).unwrap();
    set_mode(&big, 0o750);
    let big_sha = sha256_file(&big);
    let big_arg = big.to_str().unwrap();
    let mut figures = Vec::new();

    // A 20 MiB file to the guest and back over SSH: byte-exact, mode kept,
    // into an existing folder under the source's name, no temporary left.
    let out = copy(
        &env,
        &[big_arg, &format!("{VM}:/srv/cp")],
        "to-guest",
        "ssh",
    );
    assert_eq!(
        (out["files"].as_u64(), out["bytes"].as_u64()),
        (Some(1), Some(BIG as u64))
    );
    figures.push(("ssh to the guest", mib_per_s(&out)));
    assert_eq!(guest_sha256(&env, "/srv/cp/big.bin"), big_sha);
    assert_eq!(guest_sh(&env, "stat -c %a /srv/cp/big.bin").trim(), "750");
    assert_eq!(guest_sh(&env, "ls -A /srv/cp").trim(), "big.bin");
    let back = host.join("back-ssh.bin");
    let out = copy(
        &env,
        &[&format!("{VM}:/srv/cp/big.bin"), back.to_str().unwrap()],
        "from-guest",
        "ssh",
    );
    figures.push(("ssh from the guest", mib_per_s(&out)));
    assert_eq!(sha256_file(&back), big_sha);
    assert_eq!(mode_of(&back), 0o750);

    // The same through the agent, in chunks.
    let out = copy(
        &env,
        &[
            "--via",
            "agent",
            big_arg,
            &format!("{VM}:/srv/cp/agent.bin"),
        ],
        "to-guest",
        "agent",
    );
    figures.push(("agent to the guest", mib_per_s(&out)));
    assert_eq!(guest_sha256(&env, "/srv/cp/agent.bin"), big_sha);
    assert_eq!(guest_sh(&env, "stat -c %a /srv/cp/agent.bin").trim(), "750");
    let back = host.join("back-agent.bin");
    let out = copy(
        &env,
        &[
            "--via",
            "agent",
            &format!("{VM}:/srv/cp/agent.bin"),
            back.to_str().unwrap(),
        ],
        "from-guest",
        "agent",
    );
    figures.push(("agent from the guest", mib_per_s(&out)));
    assert_eq!(sha256_file(&back), big_sha);
    assert_eq!(mode_of(&back), 0o750);
    // A mode set in the guest comes back.
    guest_sh(&env, "printf x > /srv/cp/m && chmod 640 /srv/cp/m");
    let m = host.join("m");
    copy(
        &env,
        &[
            "--via",
            "agent",
            &format!("{VM}:/srv/cp/m"),
            m.to_str().unwrap(),
        ],
        "from-guest",
        "agent",
    );
    assert_eq!(
        (std::fs::read(&m).unwrap(), mode_of(&m)),
        (b"x".to_vec(), 0o640)
    );

    // Trees with -r, both ways on both paths: contents and modes kept.
    let tree = host.join("tree");
    make_tree(&tree);
    let want = host_tree(&tree);
    for via in ["ssh", "agent"] {
        let guest_root = format!("/srv/cp/tree-{via}");
        let out = copy(
            &env,
            &[
                "-r",
                "--via",
                via,
                tree.to_str().unwrap(),
                &format!("{VM}:{guest_root}"),
            ],
            "to-guest",
            via,
        );
        assert_eq!(out["files"], 3, "{out}");
        assert_eq!(guest_tree(&env, &guest_root), want, "{via}");
        assert_eq!(
            guest_sh(&env, &format!("{guest_root}/a/b/run.sh")).trim(),
            "ran-from-tree"
        );
        let back: PathBuf = host.join(format!("back-tree-{via}"));
        std::fs::create_dir(&back).unwrap();
        copy(
            &env,
            &[
                "-r",
                "--via",
                via,
                &format!("{VM}:{guest_root}"),
                back.to_str().unwrap(),
            ],
            "from-guest",
            via,
        );
        assert_eq!(host_tree(&back.join(format!("tree-{via}"))), want, "{via}");
    }

    // A missing source, either side, is named; a folder needs -r.
    let missing = host.join("no-such-file");
    let err = env.fails(&["cp", missing.to_str().unwrap(), &format!("{VM}:/srv/cp/")]);
    assert!(
        err.contains("no-such-file") && err.contains("no such file"),
        "{err}"
    );
    let err = env.fails(&[
        "cp",
        &format!("{VM}:/srv/cp/nothing-here"),
        host.to_str().unwrap(),
    ]);
    assert!(
        err.contains("/srv/cp/nothing-here") && err.contains("no such file"),
        "{err}"
    );
    let err = env.fails(&["cp", tree.to_str().unwrap(), &format!("{VM}:/srv/cp/")]);
    assert!(err.contains("-r"), "{err}");
    let err = env.fails(&[
        "cp",
        &format!("{VM}:/srv/cp/tree-ssh"),
        host.to_str().unwrap(),
    ]);
    assert!(err.contains("-r"), "{err}");

    // A full guest disk is said plainly, naming the path, on both paths, and
    // leaves nothing behind.
    guest_sh(
        &env,
        "mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small",
    );
    for via in ["ssh", "agent"] {
        let target = format!("/mnt/small/big-{via}.bin");
        let err = env.fails(&["cp", "--via", via, big_arg, &format!("{VM}:{target}")]);
        assert!(err.contains("the guest's disk is full"), "{via}: {err}");
        assert!(err.contains(&target), "{via}: {err}");
        assert_eq!(guest_sh(&env, "ls -A /mnt/small").trim(), "", "{via}");
    }

    // With the guest's network down, auto mode takes the agent and still
    // copies 20 MiB both ways byte-exact.
    let iface = guest_sh(
        &env,
        "ip -o link | awk -F': ' '$2 != \"lo\" {print $2; exit}'",
    );
    let iface = iface.trim();
    assert!(!iface.is_empty());
    env.ok(&["exec", VM, "--", "ip", "link", "set", iface, "down"]);
    copy(
        &env,
        &[big_arg, &format!("{VM}:/srv/cp/offline.bin")],
        "to-guest",
        "agent",
    );
    assert_eq!(guest_sha256(&env, "/srv/cp/offline.bin"), big_sha);
    let back = host.join("back-offline.bin");
    copy(
        &env,
        &[&format!("{VM}:/srv/cp/offline.bin"), back.to_str().unwrap()],
        "from-guest",
        "agent",
    );
    assert_eq!(sha256_file(&back), big_sha);

    for (what, rate) in figures {
        eprintln!("cp throughput, 20 MiB {what}: {rate:.1} MiB/s");
    }
}
