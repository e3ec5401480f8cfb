//! A Proxmox agent VM does what a local one does: readiness through its agent,
//! exec, host key, env, snapshots and consoles — against the in-repo fake PVE,
//! which checks every request against the real API schema.

mod common;
#[path = "lab/mod.rs"]
mod lab;
#[path = "pve/mod.rs"]
mod pve;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lab::{Lab, REMOTE, routable_local_ip};
use pve::FakeOptions;
use serde_json::Value;

const SECRET: &str = "s3cr3t 'quoted' \"double\" $HOME ✓";
const PASSED: &str = "p4ss-from-host";

/// REMOTE with an env value and a pass_env variable.
fn remote_with_env() -> String {
    format!("{REMOTE}env = {{ API_KEY = {SECRET:?} }}\npass_env = [\"PASSED_TOKEN\"]\n")
}

fn env_lab(opts: FakeOptions) -> Lab {
    let mut lab = Lab::new(opts, &remote_with_env());
    lab.env.set_env("PASSED_TOKEN", PASSED);
    lab.create_pool();
    lab
}

/// A lab whose guests' agents answer at once, with `names` up (not waited for).
fn up_no_wait(vms: &str, names: &[&str]) -> Lab {
    let lab = Lab::new(
        FakeOptions {
            agent_down_calls: 0,
            ..FakeOptions::default()
        },
        vms,
    );
    lab.create_pool();
    let mut args = vec!["up"];
    args.extend(names);
    args.push("--no-wait");
    lab.env.ok(&args);
    lab
}

/// Polls `status` until `field` is `want` (or fails after 30 s).
fn wait_status(lab: &Lab, name: &str, field: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = lab.env.status(name);
        if status[field] == want {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {field} is not {want}: {status}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn up_waits_for_the_agent_then_the_env_the_address_and_ssh_and_pins_the_host_key() {
    let ip = routable_local_ip();
    let lab = env_lab(FakeOptions {
        guest_ip: ip.to_string(),
        agent_down_calls: 3,
        ..FakeOptions::default()
    });
    let up = lab.env.json(&["up", "remote", "--timeout", "60"]);
    assert_eq!(up[0]["action"], "created", "{up}");
    assert!(up[0]["ssh_ready_seconds"].is_number(), "{up}");
    assert_eq!(up[0]["host_key_pinned"], true, "{up}");
    let (vmid, _) = lab.vm("remote");

    // The env is in the guest's root-only file, exactly, before the address was asked for.
    let written = lab
        .fake
        .guest_file(vmid, "/etc/agentvm/env")
        .expect("env file");
    assert_eq!(
        String::from_utf8(written).unwrap(),
        format!("API_KEY={SECRET}\nPASSED_TOKEN={PASSED}\n")
    );
    let requests = lab.fake.requests();
    let first = |suffix: &str| {
        requests
            .iter()
            .position(|r| r.path.ends_with(suffix))
            .unwrap_or_else(|| panic!("no {suffix} request"))
    };
    assert!(first("/agent/ping") < first("/agent/file-write"));
    assert!(
        first("/agent/file-write") < first("/agent/network-get-interfaces"),
        "the env is written before waiting for SSH"
    );
    // No other request carries a value, and neither does the daemon's log.
    for r in requests
        .iter()
        .filter(|r| !r.path.ends_with("/agent/file-write"))
    {
        for value in r.params.values() {
            assert!(
                !value.contains("s3cr3t") && !value.contains(PASSED),
                "{} {} carries an env value: {value}",
                r.method,
                r.path
            );
        }
    }
    let log = lab.env.daemon_log();
    assert!(!log.contains("s3cr3t") && !log.contains(PASSED), "{log}");

    let status = lab.env.status("remote");
    assert_eq!(status["agent"], "ready", "{status}");
    assert_eq!(
        status["ips"],
        serde_json::json!([ip.to_string()]),
        "{status}"
    );
    assert_eq!(
        status["env"],
        serde_json::json!(["API_KEY", "PASSED_TOKEN"])
    );
    assert_eq!(status["env_delivery"], "delivered", "{status}");
    assert_eq!(status["node"], "pve", "{status}");
    let text = serde_json::to_string(&status).unwrap();
    assert!(!text.contains("s3cr3t") && !text.contains(PASSED), "{text}");

    // The host key read through the agent is pinned: ssh checks it strictly.
    let key_line = pve::guest::host_key_line(vmid, "remote");
    let key: Vec<&str> = key_line.split_whitespace().take(2).collect();
    let hostkey = lab.env.json(&["hostkey", "remote"]);
    assert_eq!(hostkey["key"], key.join(" "), "{hostkey}");
    assert_eq!(hostkey["source"], "agent");
    let known = std::fs::read_to_string(hostkey["known_hosts"].as_str().unwrap()).unwrap();
    assert_eq!(known, format!("agentvm-remote {}\n", key.join(" ")));
    let config = lab.env.ok(&["ssh-config", "remote"]);
    assert!(config.contains(&format!("HostName {ip}")), "{config}");
    assert!(
        config.contains(&format!("Port {}", lab.ssh_port)),
        "{config}"
    );
    assert!(config.contains("User agent"), "{config}");
    assert!(config.contains("StrictHostKeyChecking yes"), "{config}");
    lab.no_violations();
}

#[test]
fn ssh_host_pins_the_address_ssh_uses() {
    let lab = Lab::new(
        FakeOptions {
            agent_down_calls: 0,
            ..FakeOptions::default()
        },
        &format!("{REMOTE}ssh_host = \"127.0.0.1\"\n"),
    );
    lab.create_pool();
    // The agent reports only loopback and link-local addresses; ssh_host is used instead.
    let up = lab.env.json(&["up", "remote", "--timeout", "30"]);
    assert!(up[0]["ssh_ready_seconds"].is_number(), "{up}");
    let config = lab.env.ok(&["ssh-config", "remote"]);
    assert!(config.contains("HostName 127.0.0.1"), "{config}");
    let (_, vm) = lab.vm("remote");
    assert!(
        vm.config["description"].contains("ssh-host: 127.0.0.1"),
        "{:?}",
        vm.config["description"]
    );
    lab.no_violations();
}

#[test]
fn exec_gives_the_guests_output_exit_code_stdin_and_timeout() {
    let lab = up_no_wait(REMOTE, &["remote"]);

    let out = lab.env.agentvm(&[
        "exec",
        "remote",
        "--",
        "sh",
        "-c",
        "printf 'out ✓'; printf err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out ✓");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err");

    let json = lab.env.agentvm(&[
        "exec",
        "remote",
        "--json",
        "--",
        "sh",
        "-c",
        "echo hi; exit 7",
    ]);
    assert_eq!(json.status.code(), Some(7));
    let json: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["exit_code"], 7, "{json}");
    assert_eq!(json["stdout"], "hi\n", "{json}");
    assert_eq!(json["stderr"], "", "{json}");

    // stdin (-i) goes as input-data, bytes as they are.
    let mut child = lab
        .env
        .command(&["exec", "-i", "remote", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("line one\nzwei ✓\n".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "line one\nzwei ✓\n");

    let err = lab
        .env
        .fails(&["exec", "remote", "--timeout", "1", "--", "sleep", "5"]);
    assert!(err.contains("did not finish within 1s"), "{err}");

    // The command ran under the wrapper that sets PATH, HOME and the env.
    let exec = lab
        .fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/agent/exec"))
        .unwrap();
    let argv: Vec<&str> = exec.params["command"].split('\0').collect();
    assert_eq!(&argv[..2], ["/bin/sh", "-c"], "{argv:?}");
    assert!(argv[2].contains("/etc/agentvm/env"), "{argv:?}");
    lab.no_violations();
}

#[test]
fn env_is_delivered_in_the_background_after_up_no_wait() {
    // The agent takes a while to come up: about 8 of its calls fail first.
    let lab = env_lab(FakeOptions {
        agent_down_calls: 8,
        ..FakeOptions::default()
    });
    lab.env.ok(&["up", "remote", "--no-wait"]);
    let (vmid, _) = lab.vm("remote");
    assert_eq!(lab.fake.guest_file(vmid, "/etc/agentvm/env"), None);
    let status = lab.env.status("remote");
    assert_eq!(status["env_delivery"], "pending", "{status}");
    wait_status(&lab, "remote", "env_delivery", "delivered");
    let written = lab.fake.guest_file(vmid, "/etc/agentvm/env").unwrap();
    assert_eq!(
        String::from_utf8(written).unwrap(),
        format!("API_KEY={SECRET}\nPASSED_TOKEN={PASSED}\n")
    );

    // A new daemon knows nothing of the delivery: it asks the guest's file.
    lab.env.ok(&["daemon", "--stop"]);
    assert_eq!(lab.env.status("remote")["env_delivery"], "delivered");
    // A guest whose file lacks a name is pending.
    lab.fake
        .put_guest_file(vmid, "/etc/agentvm/env", b"API_KEY=x\n");
    lab.env.ok(&["daemon", "--stop"]);
    assert_eq!(lab.env.status("remote")["env_delivery"], "pending");
    // up on the running VM writes the current values again.
    lab.env.ok(&["up", "remote", "--no-wait"]);
    wait_status(&lab, "remote", "env_delivery", "delivered");
    assert!(
        String::from_utf8(lab.fake.guest_file(vmid, "/etc/agentvm/env").unwrap())
            .unwrap()
            .contains(PASSED)
    );
    lab.no_violations();
}

#[test]
fn env_on_an_image_without_agent_is_refused() {
    let lab = Lab::new(
        FakeOptions::default(),
        "[images.bare]\nfile = \"bare.qcow2\"\nagent = false\n\n[vms.secretive]\nbackend = \"lab\"\nimage = \"bare\"\nenv = { TOKEN = \"x\" }\n",
    );
    for verb in ["plan", "up"] {
        let err = lab.env.fails(&[verb, "secretive"]);
        assert!(
            err.contains("vms.secretive") && err.contains("agent = false"),
            "{verb}: {err}"
        );
    }
    assert!(
        lab.fake
            .requests()
            .iter()
            .all(|r| !r.path.ends_with("/clone")),
        "nothing was cloned"
    );
    lab.no_violations();
}

#[test]
fn snapshots_keep_memory_when_running_and_obey_readonly() {
    let lab = up_no_wait(
        &format!("{REMOTE}\n[vms.frozen]\nbackend = \"lab\"\nreadonly = true\n"),
        &["remote", "frozen"],
    );

    let list = lab
        .env
        .json(&["snapshot", "remote", "create", "before-work"]);
    assert_eq!(list[0]["name"], "before-work", "{list}");
    assert_eq!(list[0]["state"], "running", "{list}");
    let sent = lab
        .fake
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/snapshot"))
        .unwrap();
    assert_eq!(sent.params.get("vmstate").map(String::as_str), Some("1"));

    lab.env.ok(&["down", "remote"]);
    let list = lab
        .env
        .json(&["snapshot", "remote", "create", "stopped-one"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["before-work", "stopped-one"], "{list}");
    assert_eq!(list[1]["state"], "shutoff");

    // Reverting to a snapshot with memory brings the VM back running.
    lab.env.ok(&["snapshot", "remote", "revert", "before-work"]);
    assert_eq!(lab.env.status("remote")["state"], "running");
    let list = lab
        .env
        .json(&["snapshot", "remote", "delete", "stopped-one"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let err = lab.env.fails(&["snapshot", "remote", "revert", "nope"]);
    assert!(err.contains("no snapshot nope"), "{err}");
    let err = lab.env.fails(&["snapshot", "remote", "create", "9lives"]);
    assert!(err.contains("starting with a letter"), "{err}");

    // Readonly: snapshots may be made and listed, not reverted to or deleted.
    lab.env.ok(&["snapshot", "frozen", "create", "keep"]);
    for action in ["revert", "delete"] {
        let err = lab.env.fails(&["snapshot", "frozen", action, "keep"]);
        assert!(err.contains("frozen is readonly"), "{action}: {err}");
    }
    assert_eq!(
        lab.env.json(&["snapshot", "frozen", "list"])[0]["name"],
        "keep"
    );
    lab.no_violations();
}

#[test]
fn spice_writes_a_private_viewer_file_and_says_how_to_add_a_display() {
    let lab = up_no_wait(REMOTE, &["remote"]);
    let (vmid, mut vm) = lab.vm("remote");
    // The template's display is a serial console: no SPICE.
    let err = lab.env.fails(&["spice", "remote"]);
    assert!(
        err.contains("has no SPICE display") && err.contains(&format!("qm set {vmid} --vga qxl")),
        "{err}"
    );
    vm.config.insert("vga".into(), "qxl".into());
    lab.fake.put_vm(vmid, vm);
    let spice = lab.env.json(&["spice", "remote"]);
    let file = std::path::PathBuf::from(spice["viewer_file"].as_str().unwrap());
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("[virt-viewer]\n"), "{text}");
    for key in ["type=spice", "host=", "password=", "proxy=", "tls-port="] {
        assert!(text.contains(key), "{key}: {text}");
    }
    // The proxy is the API's host, which the user can reach.
    let sent = lab
        .fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/spiceproxy"))
        .unwrap();
    assert_eq!(
        sent.params.get("proxy").map(String::as_str),
        Some("127.0.0.1")
    );
    lab.no_violations();
}

#[test]
fn a_hung_agent_costs_list_a_moment_and_up_names_it() {
    let lab = Lab::new(
        FakeOptions {
            agent_down_calls: 0,
            guest_ip: routable_local_ip().to_string(),
            ..FakeOptions::default()
        },
        &format!("{REMOTE}\n[vms.other]\nbackend = \"lab\"\n"),
    );
    lab.create_pool();
    lab.env.ok(&["up", "remote", "other", "--no-wait"]);
    let (vmid, _) = lab.vm("remote");
    lab.fake.hang_agent(vmid, Duration::from_secs(120));

    let started = Instant::now();
    let list = lab.env.json(&["list"]);
    let took = started.elapsed();
    eprintln!("list with a hung agent (120 s hang) took {took:?}");
    // Far below the hang: the hung agent was given its 2 s and no more.
    assert!(took < Duration::from_secs(30), "list took {took:?}");
    let row = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(row("remote")["agent"], "not-responding", "{list}");
    assert_eq!(row("other")["agent"], "ready", "{list}");

    let started = Instant::now();
    let err = lab.env.fails(&["up", "remote", "--timeout", "5"]);
    eprintln!(
        "up --timeout 5 of the VM with a hung agent failed after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.contains("remote: ")
            && err.contains("guest agent")
            && err.contains("no answer in time"),
        "names the VM and the agent's last answer: {err}"
    );
    lab.fake.hang_agent(vmid, Duration::ZERO);
}
