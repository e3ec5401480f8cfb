use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use super::*;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBmH2d7Pa1m6hZ1oQ7Yp3o0a3Wq8jv3rPq2q2hVfYw9x me@host";

/// A value with everything YAML and shells treat specially, but no line break.
const NASTY: &str =
    "he said \"hi\" # not a comment: {x} [y] 'q' $HOME \\n\\ \ttab ünï &a *b !c |> %";

fn env() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("EDITOR".to_string(), "vim".to_string()),
        ("NASTY".to_string(), NASTY.to_string()),
    ])
}

fn seed<'a>(keys: &'a [String], env: &'a BTreeMap<String, String>) -> Seed<'a> {
    Seed {
        hostname: "drago",
        user: "agent",
        authorized_keys: keys,
        env,
        grow_root: true,
        network_config: None,
    }
}

/// The JSON after the `#cloud-config` line.
fn cloud_config(user_data: &str) -> Value {
    let body = user_data
        .strip_prefix("#cloud-config\n")
        .expect("user-data starts with #cloud-config");
    serde_json::from_str(body).unwrap()
}

/// Opens the image with the FAT crate: label, FAT type and the root folder's
/// files with their contents.
fn read_image(path: &Path) -> (String, fatfs::FatType, BTreeMap<String, String>) {
    let file = fs::File::open(path).unwrap();
    // fatfs needs Write in its bounds even to read; a read-only handle is fine
    // as long as nothing is written, which this never does.
    let fs = fatfs::FileSystem::new(ReadOnly(file), fatfs::FsOptions::new()).unwrap();
    let mut files = BTreeMap::new();
    for entry in fs.root_dir().iter() {
        let entry = entry.unwrap();
        assert!(entry.is_file(), "{} is not a file", entry.file_name());
        let mut text = String::new();
        entry.to_file().read_to_string(&mut text).unwrap();
        files.insert(entry.file_name(), text);
    }
    (fs.volume_label(), fs.fat_type(), files)
}

struct ReadOnly(fs::File);

impl std::io::Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for ReadOnly {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        panic!("the image was written to while being checked")
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Seek for ReadOnly {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.0.seek(pos)
    }
}

/// The sample seed written to a fresh temp folder (kept while the first is held).
fn sample_image() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.img");
    let keys = vec![KEY.to_string()];
    let env = env();
    write_seed(&seed(&keys, &env), &path).unwrap();
    (dir, path)
}

fn tool(name: &str) -> Option<String> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| format!("{dir}/{name}"))
        .find(|path| Path::new(path).exists())
}

#[test]
fn the_image_is_a_fat_volume_labelled_cidata_with_the_seed_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.img");
    let keys = vec![KEY.to_string()];
    let env = env();
    let network =
        json!({"version": 2, "ethernets": {"id0": {"match": {"name": "en*"}, "dhcp4": true}}});
    let seed = Seed {
        network_config: Some(&network),
        ..seed(&keys, &env)
    };
    write_seed(&seed, &path).unwrap();

    let (label, fat_type, files) = read_image(&path);
    assert_eq!(label, "CIDATA");
    assert_eq!(fat_type, fatfs::FatType::Fat12);
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["meta-data", "network-config", "user-data"]
    );
    assert_eq!(files["meta-data"], seed.meta_data().unwrap());
    assert_eq!(files["user-data"], seed.user_data().unwrap());
    assert_eq!(files["network-config"], seed.network_config_file().unwrap());
    let stored: Value = serde_json::from_str(&files["network-config"]).unwrap();
    assert_eq!(stored, network);
    let meta: Value = serde_json::from_str(&files["meta-data"]).unwrap();
    assert_eq!(
        meta,
        json!({"instance-id": seed.instance_id().unwrap(), "local-hostname": "drago"})
    );
    assert_eq!(fs::metadata(&path).unwrap().len(), 1 << 20);
}

#[test]
fn without_network_config_there_is_no_such_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.img");
    let keys = vec![KEY.to_string()];
    let env = BTreeMap::new();
    write_seed(&seed(&keys, &env), &path).unwrap();
    let (_, _, files) = read_image(&path);
    assert_eq!(files.keys().collect::<Vec<_>>(), ["meta-data", "user-data"]);
}

#[test]
fn the_image_is_private_replaces_the_old_one_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.img");
    fs::write(&path, b"old").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let keys = vec![KEY.to_string()];
    let env = env();
    write_seed(&seed(&keys, &env), &path).unwrap();

    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["seed.img"]);
    assert_eq!(read_image(&path).0, "CIDATA");
}

#[test]
fn the_same_seed_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = vec![KEY.to_string()];
    let env = env();
    write_seed(&seed(&keys, &env), &dir.path().join("a.img")).unwrap();
    write_seed(&seed(&keys, &env), &dir.path().join("b.img")).unwrap();
    let a = fs::read(dir.path().join("a.img")).unwrap();
    let b = fs::read(dir.path().join("b.img")).unwrap();
    assert!(a == b, "two images of one seed differ");
}

#[test]
fn a_non_root_user_gets_sudo_and_the_keys_and_no_default_user() {
    let keys = vec![KEY.to_string(), "ssh-ed25519 AAAAother second".to_string()];
    let env = BTreeMap::new();
    let config = cloud_config(&seed(&keys, &env).user_data().unwrap());
    assert_eq!(
        config,
        json!({
            "hostname": "drago",
            "preserve_hostname": false,
            "users": [{
                "name": "agent",
                "ssh_authorized_keys": keys,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
                "lock_passwd": true,
            }],
            "disable_root": true,
            "ssh_deletekeys": false,
            "growpart": {"mode": "auto", "devices": ["/"]},
            "resize_rootfs": true,
        })
    );
}

#[test]
fn root_gets_the_keys_with_root_login_enabled_and_no_other_user() {
    let keys = vec![KEY.to_string()];
    let env = BTreeMap::new();
    let seed = Seed {
        user: "root",
        grow_root: false,
        ..seed(&keys, &env)
    };
    let config = cloud_config(&seed.user_data().unwrap());
    assert_eq!(
        config,
        json!({
            "hostname": "drago",
            "preserve_hostname": false,
            "users": [],
            "disable_root": false,
            "ssh_authorized_keys": [KEY],
            "ssh_deletekeys": false,
            "growpart": {"mode": "off"},
            "resize_rootfs": false,
        })
    );
}

#[test]
fn env_is_written_root_only_with_values_verbatim() {
    let keys = vec![KEY.to_string()];
    let env = env();
    let seed = seed(&keys, &env);
    let user_data = seed.user_data().unwrap();
    let config = cloud_config(&user_data);
    let expected = format!("EDITOR=vim\nNASTY={NASTY}\n");
    assert_eq!(seed.env_file(), expected);
    assert_eq!(
        config["write_files"],
        json!([{
            "path": "/etc/agentvm/env",
            "owner": "root:root",
            "permissions": "0600",
            "content": expected,
        }])
    );
    // The value cannot break out of its string: the only line of user-data
    // that starts with '#' is the header.
    assert_eq!(
        user_data
            .lines()
            .filter(|l| l.trim_start().starts_with('#'))
            .count(),
        1
    );
}

#[test]
fn user_data_reads_the_same_as_yaml() {
    // cloud-init parses user-data with PyYAML; check it reads the JSON body
    // exactly as JSON does, nasty values included.
    let yaml_ok = Command::new("python3")
        .args(["-c", "import yaml"])
        .status()
        .is_ok_and(|s| s.success());
    if !yaml_ok {
        println!("note: python3 with PyYAML not found; YAML reading not checked");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = vec![KEY.to_string()];
    let env = env();
    let user_data = seed(&keys, &env).user_data().unwrap();
    let path = dir.path().join("user-data");
    fs::write(&path, &user_data).unwrap();
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let via_yaml: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(via_yaml, cloud_config(&user_data));
    assert_eq!(
        via_yaml["write_files"][0]["content"],
        format!("EDITOR=vim\nNASTY={NASTY}\n")
    );
}

#[test]
fn line_breaks_in_env_values_and_keys_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.img");
    let keys = vec![KEY.to_string()];
    for value in ["a\nEVIL=1", "a\rb", "a\0b"] {
        let env = BTreeMap::from([("GOOD".to_string(), value.to_string())]);
        let err = write_seed(&seed(&keys, &env), &path).unwrap_err();
        assert!(format!("{err:#}").contains("GOOD"), "{err:#}");
        assert!(seed(&keys, &env).user_data().is_err());
    }
    for name in ["1ABC", "A-B", "A B", ""] {
        let env = BTreeMap::from([(name.to_string(), "v".to_string())]);
        assert!(write_seed(&seed(&keys, &env), &path).is_err(), "{name:?}");
    }
    let env = BTreeMap::new();
    let two_keys = vec![format!("{KEY}\n{KEY}")];
    assert!(write_seed(&seed(&two_keys, &env), &path).is_err());
    let bad_host = Seed {
        hostname: "a b",
        ..seed(&keys, &env)
    };
    assert!(write_seed(&bad_host, &path).is_err());
    assert!(!path.exists());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn the_instance_id_follows_the_content() {
    let keys = vec![KEY.to_string()];
    let env = env();
    let base = seed(&keys, &env);
    let id = base.instance_id().unwrap();
    assert!(id.starts_with("iid-") && id.len() == 36, "{id}");
    assert!(id[4..].chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    assert_eq!(seed(&keys, &env).instance_id().unwrap(), id);

    let other_env = BTreeMap::from([("EDITOR".to_string(), "nano".to_string())]);
    let other_keys = vec!["ssh-ed25519 AAAAother".to_string()];
    let network = json!({"version": 2});
    let changed = [
        Seed {
            grow_root: false,
            ..base
        },
        Seed {
            hostname: "other",
            ..base
        },
        Seed {
            user: "root",
            ..base
        },
        Seed {
            env: &other_env,
            ..base
        },
        Seed {
            authorized_keys: &other_keys,
            ..base
        },
        Seed {
            network_config: Some(&network),
            ..base
        },
    ];
    let mut ids: Vec<String> = changed.iter().map(|s| s.instance_id().unwrap()).collect();
    ids.push(id);
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "two different seeds share an instance id");
}

#[test]
fn the_image_grows_with_the_content() {
    assert_eq!(image_size(0), 1 << 20);
    assert_eq!(image_size(300 << 10), 1 << 20);
    assert_eq!(image_size(600 << 10), 2 << 20);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.img");
    let keys = vec![KEY.to_string()];
    let big = "x".repeat(700 << 10);
    let env = BTreeMap::from([("BIG".to_string(), big.clone())]);
    let seed = seed(&keys, &env);
    write_seed(&seed, &path).unwrap();
    let (label, _, files) = read_image(&path);
    assert_eq!(label, "CIDATA");
    assert_eq!(files["user-data"], seed.user_data().unwrap());
    assert!(files["user-data"].contains(&big));
}

#[test]
fn fsck_fat_finds_nothing_wrong() {
    let Some(fsck) = tool("fsck.fat") else {
        println!("note: fsck.fat (dosfstools) not installed; image not checked with it");
        return;
    };
    let (_dir, path) = sample_image();
    let out = Command::new(fsck)
        .args(["-n", "-l"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Exit code 0 with -n means no errors were found.
    assert!(out.status.success(), "fsck.fat -n failed:\n{text}");
    let checked: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("Checking file "))
        .collect();
    // The volume label is an entry in the root folder too, as DOS expects.
    assert_eq!(
        checked,
        [
            "Checking file /CIDATA",
            "Checking file /meta-data (META-D~1)",
            "Checking file /user-data (USER-D~1)",
        ],
        "{text}"
    );
    assert_eq!(
        text.lines().count(),
        checked.len() + 2,
        "fsck.fat said more than expected:\n{text}"
    );
}

#[test]
fn blkid_sees_a_vfat_file_system_labelled_cidata() {
    let Some(blkid) = tool("blkid") else {
        println!("note: blkid not installed; label not checked with it");
        return;
    };
    let (_dir, path) = sample_image();
    let probe = |tag: &str| {
        let out = Command::new(&blkid)
            .args(["-p", "-o", "value", "-s", tag])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "blkid -s {tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(probe("LABEL"), "CIDATA");
    assert_eq!(probe("TYPE"), "vfat");
}
