//! `agentvm secrets rekey` against the real `age` and `age-keygen` tools and
//! Nix's evaluator. Needs no VM: the host key is given with --host-key.

mod common;

use std::path::Path;
use std::process::Command;

use common::Env;
use serde_json::Value;

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(path)
        .output()
        .unwrap();
    common::assert_success(&out);
}

fn age(args: &[&str]) -> std::process::Output {
    Command::new("age")
        .args(args)
        .output()
        .expect("the age CLI (Debian package age)")
}

fn decrypts_with(identity: &Path, file: &Path) -> Option<String> {
    let out = age(&[
        "-d",
        "-i",
        identity.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

const SECRETS_NIX: &str = r#"# Who may read which secret.
let
  admin = "@ADMIN@"; # the laptop
in
{
  # drago's API token
  "drago-token.age".publicKeys = [ admin ];
  "armored.age".publicKeys = [
    admin
  ];
  "broken.age".publicKeys = [ admin ];
}
"#;

const SOPS_YAML: &str = "creation_rules:\n  # app config\n  - path_regex: secrets/app\\.yaml$\n    key_groups:\n      - age:\n          - age1qyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqs3290gq\n";

#[test]
fn rekey_adds_the_host_key_re_encrypts_and_remove_takes_it_back() {
    let env = Env::new();
    let dir = env.dir.path();
    let (admin, host) = (dir.join("admin"), dir.join("host"));
    keygen(&admin);
    keygen(&host);
    let admin_pub = std::fs::read_to_string(admin.with_extension("pub")).unwrap();
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let nix_text = SECRETS_NIX.replace("@ADMIN@", admin_pub.trim());
    std::fs::write(secrets.join("secrets.nix"), &nix_text).unwrap();
    std::fs::write(dir.join(".sops.yaml"), SOPS_YAML).unwrap();
    for (name, armor, text) in [
        ("drago-token.age", false, "token-123"),
        ("armored.age", true, "armored secret"),
    ] {
        let mut cmd = Command::new("age");
        cmd.arg("-e").arg("-R").arg(admin.with_extension("pub"));
        if armor {
            cmd.arg("-a");
        }
        let mut child = cmd
            .arg("-o")
            .arg(secrets.join(name))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    }
    std::fs::write(secrets.join("broken.age"), b"this is not an age file").unwrap();
    env.write_raw_fleet(
        "[images.x]\nfile = \"x.qcow2\"\n[vms.drago]\nimage = \"x\"\nsecrets = [\"secrets/drago-token.age\", \"secrets/armored.age\", \"secrets/broken.age\", \"secrets/app.yaml\"]\n",
    );

    let out = env.agentvm(&[
        "secrets",
        "rekey",
        "drago",
        "--json",
        "--identity",
        admin.to_str().unwrap(),
        "--host-key",
        host.with_extension("pub").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "broken.age fails, so the exit code says so: {stderr}"
    );
    assert!(stderr.contains("broken.age: left as it was"), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rekeyed"].as_array().unwrap().len(), 2, "{report}");

    // Both the guest's host key and the admin key open the re-keyed files (real age CLI).
    for (name, text) in [
        ("drago-token.age", "token-123"),
        ("armored.age", "armored secret"),
    ] {
        let file = secrets.join(name);
        assert_eq!(
            decrypts_with(&host, &file).as_deref(),
            Some(text),
            "{name} with the host key"
        );
        assert_eq!(
            decrypts_with(&admin, &file).as_deref(),
            Some(text),
            "{name} with the admin key"
        );
    }
    assert!(
        std::fs::read(secrets.join("armored.age"))
            .unwrap()
            .starts_with(b"-----BEGIN AGE")
    );
    assert_eq!(
        std::fs::read(secrets.join("broken.age")).unwrap(),
        b"this is not an age file"
    );

    // secrets.nix keeps its comments and layout; only the key was added.
    let host_pub = std::fs::read_to_string(host.with_extension("pub")).unwrap();
    let host_key: Vec<&str> = host_pub.split_whitespace().take(2).collect();
    let literal = format!("\"{} agentvm-drago\"", host_key.join(" "));
    let edited = std::fs::read_to_string(secrets.join("secrets.nix")).unwrap();
    assert!(
        edited.contains("# Who may read which secret.") && edited.contains("# drago's API token")
    );
    assert_eq!(edited.matches(&literal).count(), 2, "{edited}");
    assert!(
        !edited.contains("\"broken.age\".publicKeys = [ admin \""),
        "a failed file keeps its entry: {edited}"
    );

    // .sops.yaml gets the age form of the host key, as ssh-to-age computes it.
    let sops = std::fs::read_to_string(dir.join(".sops.yaml")).unwrap();
    let age_recipient = report["age_recipient"].as_str().unwrap();
    assert!(
        sops.contains(&format!("          - {age_recipient} # agentvm-drago\n")),
        "{sops}"
    );
    assert_eq!(
        age_recipient,
        age_keygen_recipient(&host),
        "independent derivation with age-keygen"
    );

    // A second run changes no byte and no mtime, and says the files were already done.
    let before = snapshot(dir);
    let again = env.agentvm(&[
        "secrets",
        "rekey",
        "drago",
        "--json",
        "--identity",
        admin.to_str().unwrap(),
        "--host-key",
        host.with_extension("pub").to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(1), "broken.age still fails");
    let report: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["rekeyed"], Value::Array(vec![]), "{report}");
    assert_eq!(report["edited"], Value::Array(vec![]), "{report}");
    let unchanged: Vec<&str> = report["unchanged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(unchanged.len(), 2, "{report}");
    assert!(
        unchanged.iter().any(|f| f.ends_with("drago-token.age"))
            && unchanged.iter().any(|f| f.ends_with("armored.age")),
        "{report}"
    );
    assert_eq!(snapshot(dir), before, "the second run wrote nothing");

    // --remove restores both files and re-encrypts without the host key.
    let removed = env.agentvm(&[
        "secrets",
        "rekey",
        "drago",
        "--remove",
        "--identity",
        admin.to_str().unwrap(),
    ]);
    assert_eq!(removed.status.code(), Some(1), "broken.age still fails");
    assert_eq!(
        std::fs::read_to_string(secrets.join("secrets.nix")).unwrap(),
        nix_text
    );
    assert_eq!(
        std::fs::read_to_string(dir.join(".sops.yaml")).unwrap(),
        SOPS_YAML
    );
    let token = secrets.join("drago-token.age");
    assert_eq!(
        decrypts_with(&host, &token),
        None,
        "the host key no longer opens it"
    );
    assert_eq!(decrypts_with(&admin, &token).as_deref(), Some("token-123"));
}

/// Every file under `dir` with its bytes and modification time.
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>, std::time::SystemTime)> {
    let mut files = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                folders.push(path);
            } else if meta.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                files.push((path, bytes, meta.modified().unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// The age recipient of an ed25519 SSH key derived the other way round: the
/// private scalar (sha512 of the seed) as an age identity, and `age-keygen -y`.
fn age_keygen_recipient(private_key: &Path) -> String {
    use sha2::Digest;
    let key = ssh_key::PrivateKey::read_openssh_file(private_key).unwrap();
    let seed = key.key_data().ed25519().unwrap().private.to_bytes();
    let scalar = sha2::Sha512::digest(seed);
    let hrp = bech32::Hrp::parse("AGE-SECRET-KEY-").unwrap();
    let identity = bech32::encode_upper::<bech32::Bech32>(hrp, &scalar[..32]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("id");
    std::fs::write(&file, format!("{identity}\n")).unwrap();
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(&file)
        .output()
        .unwrap();
    common::assert_success(&out);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn a_missing_entry_or_identity_is_reported() {
    let env = Env::new();
    env.write_raw_fleet("[images.x]\nfile = \"x.qcow2\"\n[vms.drago]\nimage = \"x\"\n");
    let err = env.fails(&["secrets", "rekey", "drago", "--identity", "/nonexistent"]);
    assert!(err.contains("has no secrets"), "{err}");
}

#[test]
fn a_corrupt_record_file_is_an_error_and_left_as_it_is() {
    let env = Env::new();
    let dir = env.dir.path();
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("secrets.nix"), "{ }\n").unwrap();
    env.write_raw_fleet(
        "[images.x]\nfile = \"x.qcow2\"\n[vms.drago]\nimage = \"x\"\nsecrets = [\"secrets/drago-token.age\"]\n",
    );
    // A record cut short, as a full disk or a bad hand edit would leave it.
    let record = env.home().join("secrets.json");
    std::fs::create_dir_all(env.home()).unwrap();
    let corrupt = b"{\n  \"drago\": {\n    \"ssh\": \"ssh-ed25519 AAAA agentvm-drago\",\n".to_vec();
    std::fs::write(&record, &corrupt).unwrap();
    let (admin, host) = (dir.join("admin"), dir.join("host"));
    keygen(&admin);
    keygen(&host);
    let host_pub = host.with_extension("pub");

    for extra in [
        &["--remove"][..],
        &["--host-key", host_pub.to_str().unwrap()][..],
    ] {
        let mut args = vec![
            "secrets",
            "rekey",
            "drago",
            "--identity",
            admin.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = env.agentvm(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail: {stderr}");
        assert!(
            stderr.contains(&record.display().to_string()) && stderr.contains("line 4 column 0"),
            "{args:?}: {stderr}"
        );
        assert_eq!(
            std::fs::read(&record).unwrap(),
            corrupt,
            "{args:?} left the record as it was"
        );
        assert_eq!(
            std::fs::read_to_string(secrets.join("secrets.nix")).unwrap(),
            "{ }\n"
        );
    }
}
