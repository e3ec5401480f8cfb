//! Talking to the real test guest through QMP and its guest agent.

mod common;

use common::{Env, GUEST_TIMEOUT, port_of};
use serde_json::Value;

/// A running VM of the test guest, ready (SSH and agent).
fn running(env: &Env, name: &str, extra: &str) {
    env.write_fleet(&format!("[vms.{name}]\n{extra}\n"));
    env.owns(&[name]);
    env.ok(&["up", name, "--timeout", GUEST_TIMEOUT]);
}

fn exec(env: &Env, name: &str, script: &str) -> (i32, String, String) {
    let out = env.agentvm(&["exec", name, "--", "/bin/sh", "-c", script]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn exec_returns_output_and_exit_codes_even_with_the_network_down() {
    let env = Env::new();
    running(&env, "g-exec", "");
    assert_eq!(
        exec(&env, "g-exec", "echo hello"),
        (0, "hello\n".into(), String::new())
    );
    assert_eq!(
        exec(&env, "g-exec", "echo out; echo err >&2; exit 7"),
        (7, "out\n".into(), "err\n".into())
    );
    let out = env.agentvm(&[
        "exec",
        "--json",
        "g-exec",
        "--",
        "/bin/sh",
        "-c",
        "printf x; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["exit_code"], 3);
    assert_eq!(json["stdout"], "x");

    // -i hands the command agentvm's standard input, bytes as they are.
    let mut child = env
        .command(&[
            "exec",
            "-i",
            "g-exec",
            "--",
            "/bin/sh",
            "-c",
            "cat; echo end",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), "in ✓\n".as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in ✓\nend\n");

    // The agent channel does not need the guest's network.
    assert_eq!(exec(&env, "g-exec", "ip link set eth0 down").0, 0);
    assert_eq!(
        exec(&env, "g-exec", "cat /sys/class/net/eth0/operstate").1,
        "down\n"
    );
    assert_eq!(
        exec(&env, "g-exec", "echo still here"),
        (0, "still here\n".into(), String::new())
    );
}

#[test]
fn status_shows_the_agent_and_routable_addresses() {
    let env = Env::new();
    running(&env, "g-status", "");
    let status = env.status("g-status");
    assert_eq!(status["agent"], "ready", "{status}");
    // QEMU's user network gives the guest 10.0.2.15 by DHCP at once and a SLAAC
    // IPv6 address (fec0::…) some time later: the IPv4 one must be there, and
    // whatever else is listed must be a routable address.
    let ips: Vec<std::net::IpAddr> = status["ips"]
        .as_array()
        .unwrap_or_else(|| panic!("ips is not an array: {status}"))
        .iter()
        .map(|ip| {
            ip.as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("not an address: {ip}"))
        })
        .collect();
    assert!(ips.contains(&"10.0.2.15".parse().unwrap()), "{status}");
    for ip in &ips {
        let routable = match ip {
            std::net::IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
            std::net::IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
        };
        assert!(routable, "{ip} is not routable: {status}");
    }
}

#[test]
fn hostkey_matches_a_key_scan_and_is_then_checked_strictly() {
    let env = Env::new();
    running(&env, "g-key", "");
    let key = env.json(&["hostkey", "g-key"]);
    assert_eq!(key["source"], "agent", "{key}");
    let port = port_of(&env.status("g-key"), "ssh_port");
    let scan = std::process::Command::new("ssh-keyscan")
        .args(["-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    let scanned = String::from_utf8_lossy(&scan.stdout);
    let scanned_key: Vec<&str> = scanned
        .lines()
        .find(|l| !l.starts_with('#'))
        .unwrap_or_else(|| panic!("no key scanned: {scanned}"))
        .split_whitespace()
        .skip(1)
        .collect();
    assert_eq!(key["key"].as_str().unwrap(), scanned_key.join(" "));
    let config = env.ok(&["ssh-config", "g-key"]);
    assert!(config.contains("StrictHostKeyChecking yes"), "{config}");
    assert_eq!(env.ssh("g-key", "uname -s").trim(), "Linux");
}

#[test]
fn without_an_agent_hostkey_scans_the_port_and_says_so() {
    let env = Env::new();
    let guest = common::guest_dir();
    env.write_raw_fleet(&format!(
        "[defaults]\ncpus = 1\nmemory = \"256MiB\"\n[images.noagent]\nkernel = {:?}\ninitrd = {:?}\nfile = {:?}\ncmdline = \"console=ttyS0 quiet\"\nagent = false\n[vms.g-noagent]\nimage = \"noagent\"\n",
        guest.join("vmlinuz").display().to_string(),
        guest.join("initrd.img").display().to_string(),
        guest.join("disk.qcow2").display().to_string(),
    ));
    env.owns(&["g-noagent"]);
    env.ok(&["up", "g-noagent", "--timeout", GUEST_TIMEOUT]);
    assert_eq!(env.status("g-noagent")["agent"], "disabled");
    let out = env.agentvm(&["hostkey", "g-noagent", "--json"]);
    common::assert_success(&out);
    let key: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(key["source"], "ssh-keyscan");
    assert!(String::from_utf8_lossy(&out.stderr).contains("SSH key scan"));
    // No agent: exec says why it cannot run.
    let err = env.fails(&["exec", "g-noagent", "--", "true"]);
    assert!(err.contains("agent = false"), "{err}");
}

#[test]
fn down_goes_through_the_guest_agent() {
    let env = Env::new();
    running(&env, "g-down", "");
    let down = env.json(&["down", "g-down", "--timeout", "60"]);
    assert_eq!(down[0]["stopped_by"], "agent", "{down}");
    assert_eq!(env.status("g-down")["state"], "stopped");
}

#[test]
fn screenshot_is_a_png_of_the_display_size() {
    let env = Env::new();
    running(&env, "g-shot", "");
    let png = env.dir.path().join("shot.png");
    env.ok(&["screenshot", "g-shot", png.to_str().unwrap()]);
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    // libvirt's own screenshot API, a separate path to the same display.
    let theirs = env.dir.path().join("virsh.img");
    let out = std::process::Command::new("virsh")
        .args(["-c", "qemu:///session", "screenshot", "agentvm-g-shot"])
        .arg(&theirs)
        .output()
        .unwrap();
    common::assert_success(&out);
    let data = std::fs::read(&theirs).unwrap();
    let (width, height) = if data.starts_with(b"\x89PNG") {
        let d = png::Decoder::new(std::io::Cursor::new(data));
        let r = d.read_info().unwrap();
        (r.info().width, r.info().height)
    } else {
        let (w, h, _) = agentvm::screenshot::parse_ppm(&data).unwrap();
        (w, h)
    };
    assert_eq!((frame.width, frame.height), (width, height));
    assert!(
        frame.width >= 320 && frame.height >= 200,
        "{}x{}",
        frame.width,
        frame.height
    );
    assert!(
        buf.iter().any(|&b| b != 0),
        "the screen has something on it"
    );
}

#[test]
fn snapshot_revert_restores_disk_bytes_and_readonly_vms_keep_theirs() {
    let env = Env::new();
    running(&env, "g-snap", "");
    let write = |text: &str| {
        let (code, _, err) = exec(
            &env,
            "g-snap",
            &format!("printf {text} | dd of=/dev/vda conv=fsync 2>/dev/null"),
        );
        assert_eq!(code, 0, "{err}");
    };
    let read = || exec(&env, "g-snap", "dd if=/dev/vda bs=1 count=6 2>/dev/null").1;
    write("before");
    env.ok(&["snapshot", "g-snap", "create", "s1"]);
    write("after!");
    assert_eq!(read(), "after!");
    env.ok(&["snapshot", "g-snap", "revert", "s1"]);
    assert_eq!(env.status("g-snap")["state"], "running");
    assert_eq!(read(), "before");
    let list = env.json(&["snapshot", "g-snap", "list"]);
    assert_eq!(list[0]["name"], "s1", "{list}");

    env.write_fleet("[vms.g-snap]\nreadonly = true\n");
    let err = env.fails(&["snapshot", "g-snap", "revert", "s1"]);
    assert!(err.contains("readonly"), "{err}");
    let err = env.fails(&["snapshot", "g-snap", "delete", "s1"]);
    assert!(err.contains("readonly"), "{err}");
    env.write_fleet("[vms.g-snap]\n");
    env.ok(&["snapshot", "g-snap", "delete", "s1"]);
    assert_eq!(
        env.json(&["snapshot", "g-snap", "list"]),
        serde_json::json!([])
    );
}

#[test]
fn sync_clock_sets_a_lagging_guest_clock_to_the_hosts() {
    let env = Env::new();
    running(&env, "g-clock", "");
    // As after a host suspend: the guest's clock far behind.
    let (code, _, err) = exec(
        &env,
        "g-clock",
        "date -u -s '2001-02-03 04:05:06' >/dev/null",
    );
    assert_eq!(code, 0, "{err}");
    let synced = env.json(&["sync-clock", "g-clock"]);
    let drift = synced[0]["drift_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("{synced}"));
    let behind = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 981_173_106_000;
    assert!(
        (drift + behind).abs() < 60_000,
        "drift {drift} ms, the clock was set {behind} ms behind"
    );
    let guest: i64 = exec(&env, "g-clock", "date +%s").1.trim().parse().unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((guest - host).abs() <= 5, "guest {guest}, host {host}");
    // A VM that is not running says so.
    env.ok(&["down", "g-clock"]);
    let err = env.fails(&["sync-clock", "g-clock"]);
    assert!(err.contains("g-clock"), "{err}");
}

#[test]
fn exec_stream_prints_output_while_the_command_runs() {
    use std::io::{BufRead, BufReader};
    let env = Env::new();
    running(&env, "g-stream", "");
    let mut child = env
        .command(&[
            "exec",
            "--stream",
            "g-stream",
            "--",
            "/bin/sh",
            "-c",
            "echo first; echo oops >&2; sleep 4; echo second; exit 3",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    // The first line came while the command still ran (it sleeps 4 s after it).
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first line came only when the command had ended"
    );
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert!(lines.next().is_none());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(3));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("oops"), "{err}");
    // Nothing is left in the guest.
    let (code, left, _) = exec(
        &env,
        "g-stream",
        "ls -d /tmp/agentvm-stream-* 2>/dev/null; true",
    );
    assert_eq!((code, left.as_str()), (0, ""));
    // --stream takes no standard input.
    let err = env.fails(&["exec", "--stream", "-i", "g-stream", "--", "cat"]);
    assert!(err.contains("--stream") || err.contains("-i"), "{err}");
}
