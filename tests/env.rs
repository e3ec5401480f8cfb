//! A VM's env: delivered to the guest through fw_cfg from a private file, never
//! on a command line, in the domain XML or in a log; `pass_env` copies host
//! variables at `up`; `exec` runs commands with it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{Env, GUEST_TIMEOUT};

/// Every host process's command line this user can read, joined.
fn all_command_lines() -> Vec<(String, String)> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            lines.push((pid, String::from_utf8_lossy(&raw).replace('\0', " ")));
        }
    }
    lines
}

/// `agentvm ARGS…` with AGENTVM_TEST_TOKEN set to `token`; must succeed.
fn with_token(env: &Env, token: &str, args: &[&str]) -> std::process::Output {
    let out = env
        .command(args)
        .env("AGENTVM_TEST_TOKEN", token)
        .output()
        .unwrap();
    common::assert_success(&out);
    out
}

fn dumpxml(vm: &str) -> String {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///session", "dumpxml", &format!("agentvm-{vm}")])
        .output()
        .expect("virsh (libvirt-clients) is needed by the tests");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn env_reaches_the_guest_and_no_command_line_xml_or_log() {
    let env = Env::new();
    let secret = format!("sk-test-{}", std::process::id() * 7919);
    let passed = format!("ghp-test-{}", std::process::id() * 104_729);
    env.write_fleet(&format!(
        "[vms.env-fwcfg]\nenv = {{ API_KEY = \"{secret}\", GREETING = \"hello, world\" }}\npass_env = [\"AGENTVM_TEST_TOKEN\"]\n"
    ));
    env.owns(&["env-fwcfg"]);

    // A pass_env variable that is unset is an error naming it, before anything is made.
    let out = env
        .command(&["up", "env-fwcfg", "--no-wait"])
        .env_remove("AGENTVM_TEST_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AGENTVM_TEST_TOKEN is not set"), "{stderr}");
    assert!(!common::domain_exists("env-fwcfg"));

    with_token(
        &env,
        &passed,
        &["up", "env-fwcfg", "--timeout", GUEST_TIMEOUT],
    );

    // In the guest, as the credential (the test guest copies it to /run).
    assert_eq!(
        env.ssh("env-fwcfg", "cat /run/agentvm.env"),
        format!("AGENTVM_TEST_TOKEN={passed}\nAPI_KEY={secret}\nGREETING=hello, world\n")
    );
    // exec runs commands with it.
    assert_eq!(
        env.ok(&[
            "exec",
            "env-fwcfg",
            "--",
            "sh",
            "-c",
            "echo \"$API_KEY|$AGENTVM_TEST_TOKEN|$GREETING\""
        ]),
        format!("{secret}|{passed}|hello, world\n")
    );

    // Nowhere a value could leak on the host.
    for (pid, line) in all_command_lines() {
        assert!(
            !line.contains(&secret) && !line.contains(&passed),
            "pid {pid} has an env value on its command line: {line}"
        );
    }
    // The daemon that `up` started did not inherit the pass_env value either.
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(raw) = std::fs::read(entry.path().join("environ")) {
            assert!(
                !String::from_utf8_lossy(&raw).contains(&passed),
                "process {:?} has the pass_env value in its environment",
                entry.file_name()
            );
        }
    }
    let qemu = all_command_lines()
        .into_iter()
        .find(|(_, l)| l.contains("qemu-system") && l.contains("agentvm-env-fwcfg"))
        .expect("the VM's QEMU process");
    assert!(
        qemu.1.contains("opt/io.systemd.credentials/agentvm.env"),
        "QEMU gets the credential by file: {}",
        qemu.1
    );
    let xml = dumpxml("env-fwcfg");
    assert!(!xml.contains(&secret) && !xml.contains(&passed), "{xml}");
    assert!(xml.contains("<sysinfo type='fwcfg'>"), "{xml}");
    let qemu_log = common::libvirt_domain_log("env-fwcfg");
    let log = std::fs::read_to_string(&qemu_log).unwrap_or_default();
    assert!(
        !log.is_empty(),
        "libvirt's domain log {} is missing",
        qemu_log.display()
    );
    assert!(!log.contains(&secret) && !log.contains(&passed), "{log}");
    let daemon_log = env.daemon_log();
    assert!(!daemon_log.contains(&secret) && !daemon_log.contains(&passed));

    // The file QEMU reads is the user's alone.
    let file = env.home().join("vms/env-fwcfg/agentvm.env");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", file.display());

    // status shows the names, never the values.
    let status = env.status("env-fwcfg");
    assert_eq!(
        status["env"],
        serde_json::json!(["AGENTVM_TEST_TOKEN", "API_KEY", "GREETING"])
    );
    let text = status.to_string();
    assert!(!text.contains(&secret) && !text.contains(&passed), "{text}");

    // A new value for a running VM is not delivered behind its back: up says
    // a restart is needed, and the next start delivers it.
    let rotated = format!("{passed}-rotated");
    let out = with_token(&env, &rotated, &["up", "env-fwcfg", "--no-wait", "--json"]);
    let up: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(up[0]["restart_needed"], true, "{up}");
    env.ok(&["down", "env-fwcfg"]);
    with_token(
        &env,
        &rotated,
        &["up", "env-fwcfg", "--timeout", GUEST_TIMEOUT],
    );
    assert_eq!(
        env.ok(&[
            "exec",
            "env-fwcfg",
            "--",
            "sh",
            "-c",
            "cat /run/agentvm.env | head -n1"
        ]),
        format!("AGENTVM_TEST_TOKEN={rotated}\n")
    );
}
