//! A real distribution guest: Debian 12 with systemd, OpenSSH and
//! qemu-guest-agent, booting from its qcow2 disk with GRUB (built by
//! `images/debian/build.sh`), and its cloud-init variant given a NoCloud seed.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Env, debian_image};
use serde_json::{Value, json};

/// TCG boots of a full distribution take a while; cloud-init more.
const BOOT_TIMEOUT: &str = "600";

fn fleet(env: &Env, images: &str, vms: &str) {
    env.write_raw_fleet(&format!(
        "[defaults]\ncpus = 2\nmemory = \"1GiB\"\n\n{images}\n{vms}"
    ));
}

fn cmdlines_contain(needle: &str) -> Option<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find_map(|entry| {
            let raw = std::fs::read(entry.path().join("cmdline")).ok()?;
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            line.contains(needle).then_some(line)
        })
}

/// Runs one guest agent command through libvirt, as agentvm's Proxmox backend
/// does through PVE's agent API; returns its `return` value.
fn guest_agent(vm: &str, command: Value) -> Value {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///session", "qemu-agent-command"])
        .arg(format!("agentvm-{vm}"))
        .arg(command.to_string())
        .output()
        .expect("virsh (libvirt-clients) is needed by the tests");
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    reply["return"].clone()
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                text.push('=');
            }
        }
    }
    text
}

/// Writes `content` to `path` in the guest the way PVE's `agent/file-write`
/// does: guest-file-open (mode "w"), guest-file-write, guest-file-close.
fn write_through_agent(vm: &str, path: &str, content: &str) {
    let handle = guest_agent(
        vm,
        json!({"execute": "guest-file-open", "arguments": {"path": path, "mode": "w"}}),
    );
    assert!(handle.is_i64(), "guest-file-open: {handle}");
    guest_agent(
        vm,
        json!({"execute": "guest-file-write",
               "arguments": {"handle": handle, "buf-b64": base64(content.as_bytes())}}),
    );
    guest_agent(
        vm,
        json!({"execute": "guest-file-close", "arguments": {"handle": handle}}),
    );
}

/// Prints `$A|$B` as a new login shell sees them, a line break, and the same
/// from root's systemd manager (user@0.service), whose environment
/// `show-environment` prints shell-quoted for bash to read back.
fn login_and_manager_env(a: &str, b: &str) -> String {
    format!(
        r#"bash -lc 'printf "%s\n" "${a}|${b}"' && XDG_RUNTIME_DIR=/run/user/0 systemctl --user show-environment > /tmp/user-env && bash -c '. /tmp/user-env && printf %s "${a}|${b}"'"#
    )
}

/// How long the last run of agentvm-env-update.service took, in seconds.
fn last_update_run(env: &Env, vm: &str) -> f64 {
    let out = env.ssh(
        vm,
        "for p in ExecMainStartTimestampMonotonic ExecMainExitTimestampMonotonic; do systemctl show -P $p agentvm-env-update.service; done",
    );
    let us: Vec<f64> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
    (us[1] - us[0]) / 1e6
}

/// Polls `command` over SSH until it prints `want` (at most 60 s).
fn wait_for_output(env: &Env, vm: &str, command: &str, want: &str) {
    let started = Instant::now();
    loop {
        let got = env.ssh(vm, command);
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "still {got:?} instead of {want:?} after 60 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn debian_lifecycle_with_agent_host_key_env_and_persistence() {
    let env = Env::new();
    let image = debian_image("plain");
    let secret = format!("deb-secret-{}", std::process::id() * 31);
    fleet(
        &env,
        &format!(
            "[images.debian]\nfile = {:?}\n",
            image.display().to_string()
        ),
        &format!(
            "[vms.deb-life]\nimage = \"debian\"\ndisk = \"4GiB\"\nenv = {{ API_KEY = \"{secret}\", MODE = \"it's \\\"quoted\\\" $HOME\" }}\n"
        ),
    );
    env.owns(&["deb-life"]);

    let started = Instant::now();
    let up = env.json(&["up", "deb-life", "--timeout", BOOT_TIMEOUT]);
    let ready = up[0]["ssh_ready_seconds"].as_f64().expect("ssh-ready time");
    eprintln!(
        "debian: up -> ssh-ready in {ready:.1} s ({:.1} s wall)",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(up[0]["action"], "created", "{up}");
    // The host key came through the guest agent and is pinned: ssh is strict now.
    assert_eq!(up[0]["host_key_pinned"], true, "{up}");
    let pinned = env.ok(&["hostkey", "deb-life"]);
    let on_disk = env.ssh("deb-life", "cat /etc/ssh/ssh_host_ed25519_key.pub");
    let key_blob = |text: &str| text.split_whitespace().nth(1).map(str::to_string);
    assert!(
        key_blob(&on_disk).is_some() && pinned.contains(&key_blob(&on_disk).unwrap()),
        "pinned {pinned:?} vs guest {on_disk:?}"
    );
    assert!(
        std::fs::read_to_string(env.home().join("vms/deb-life/known_hosts"))
            .unwrap()
            .contains(&key_blob(&on_disk).unwrap())
    );

    // systemd imported the env credential from fw_cfg; no host command line has it.
    assert_eq!(
        env.ssh("deb-life", "cat /run/credentials/@system/agentvm.env"),
        format!("API_KEY={secret}\nMODE=it's \"quoted\" $HOME\n")
    );
    assert_eq!(cmdlines_contain(&secret), None);
    // A login shell has it; so do commands run through the agent.
    assert_eq!(
        env.ssh("deb-life", "bash -lc 'printf %s \"$API_KEY\"'"),
        secret
    );
    assert_eq!(
        env.ok(&["exec", "deb-life", "--", "sh", "-c", "printf %s \"$MODE\""]),
        "it's \"quoted\" $HOME"
    );

    // So do services the user's systemd manager starts (user@.service reads it).
    assert_eq!(
        env.ssh(
            "deb-life",
            // The manager's environment (what its services get), printed
            // shell-quoted by show-environment, read back by bash.
            r#"systemctl start user@0.service && XDG_RUNTIME_DIR=/run/user/0 systemctl --user show-environment > /tmp/user-env && bash -c '. /tmp/user-env && printf %s "$MODE|$API_KEY"'"#
        ),
        format!("it's \"quoted\" $HOME|{secret}")
    );

    // The credential wins over /etc/agentvm/env: a file written through the
    // agent is published again, but from the credential.
    let last_run = || {
        env.ssh(
            "deb-life",
            "systemctl show -P InactiveEnterTimestampMonotonic agentvm-env-update.service",
        )
    };
    let before = last_run();
    write_through_agent("deb-life", "/etc/agentvm/env", "API_KEY=from-the-file\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    while last_run() == before {
        assert!(
            Instant::now() < deadline,
            "agentvm-env-update.service did not run"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        env.ssh("deb-life", &login_and_manager_env("API_KEY", "MODE")),
        format!("{secret}|it's \"quoted\" $HOME\n{secret}|it's \"quoted\" $HOME")
    );

    // The root file system grew from the image's 2 GiB to the VM's 4 GiB disk.
    let size: u64 = env
        .ssh("deb-life", "df -B1 --output=size / | tail -n1")
        .trim()
        .parse()
        .unwrap();
    assert!(size > 3 << 30, "root file system is {size} bytes");

    // Data survives a graceful stop through the agent and a start.
    env.ssh("deb-life", "echo survives > /root/marker && sync");
    let down = env.json(&["down", "deb-life", "--timeout", "120"]);
    assert_eq!(down[0]["stopped_by"], "agent", "{down}");
    let again = env.json(&["up", "deb-life", "--timeout", BOOT_TIMEOUT]);
    assert_eq!(again[0]["action"], "started", "{again}");
    assert_eq!(env.ssh("deb-life", "cat /root/marker"), "survives\n");
    // Same machine, same host key: strict checking still passes.
    assert_eq!(
        env.ssh("deb-life", "cat /etc/ssh/ssh_host_ed25519_key.pub"),
        on_disk
    );
}

/// On Proxmox there is no fw_cfg: the host writes the env to /etc/agentvm/env
/// through the guest agent once the guest has booted, and may rewrite it
/// while the guest runs. Without a reboot, new login shells and the running
/// user manager get each version.
#[test]
fn env_written_through_the_agent_after_boot_reaches_shells_and_the_user_manager() {
    let env = Env::new();
    let image = debian_image("plain");
    fleet(
        &env,
        &format!(
            "[images.debian]\nfile = {:?}\n",
            image.display().to_string()
        ),
        "[vms.deb-lateenv]\nimage = \"debian\"\n",
    );
    env.owns(&["deb-lateenv"]);
    let up = env.json(&["up", "deb-lateenv", "--timeout", BOOT_TIMEOUT]);
    eprintln!(
        "debian late env: up -> ssh-ready in {:.1} s",
        up[0]["ssh_ready_seconds"].as_f64().unwrap_or(-1.0)
    );

    // No credential and no file yet: nothing published. The folder is root's alone.
    assert_eq!(
        env.ssh(
            "deb-lateenv",
            "ls /run/credentials/@system/agentvm.env /etc/agentvm/env /run/agentvm/env 2>&1 | grep -c 'No such file'; stat -c '%a %U:%G' /etc/agentvm"
        ),
        "3\n700 root:root\n"
    );
    // Root's systemd manager runs before the env arrives.
    let probe = login_and_manager_env("LATE_MODE", "LATE_TOKEN");
    env.ssh("deb-lateenv", "systemctl start user@0.service");
    assert_eq!(env.ssh("deb-lateenv", &probe), "|\n|");

    let token = format!("late-{}", std::process::id() * 37);
    let mode = r#"it's "quoted",  $HOME $(id) `id` \n\ and ${PATH}"#;
    let written = Instant::now();
    write_through_agent(
        "deb-lateenv",
        "/etc/agentvm/env",
        &format!("LATE_TOKEN={token}\nLATE_MODE={mode}\n"),
    );
    let write_took = written.elapsed();
    let want = format!("{mode}|{token}\n{mode}|{token}");
    wait_for_output(&env, "deb-lateenv", &probe, &want);
    eprintln!(
        "debian late env: written through the agent in {:.2} s; in a new login shell and the user manager {:.1} s after the write began (seen over SSH; agentvm-env-update.service ran {:.1} s)",
        write_took.as_secs_f64(),
        written.elapsed().as_secs_f64(),
        last_update_run(&env, "deb-lateenv")
    );
    // A user manager started from now on reads it too (EnvironmentFile=).
    env.ssh("deb-lateenv", "systemctl restart user@0.service");
    assert_eq!(env.ssh("deb-lateenv", &probe), want);

    // qemu-ga creates files with the mode it is given (0666, see the probe),
    // so the folder is what keeps the env private; publishing also narrows
    // the file to 0600. The published copies are root's alone.
    write_through_agent("deb-lateenv", "/root/qga-mode-probe", "probe\n");
    let modes = env.ssh(
        "deb-lateenv",
        "stat -c '%n %a %U:%G' /root/qga-mode-probe /etc/agentvm /etc/agentvm/env /run/agentvm/env /run/agentvm/env.systemd",
    );
    eprintln!("debian late env: {}", modes.replace('\n', "; "));
    let lines: Vec<&str> = modes.lines().collect();
    assert_eq!(
        lines[1..],
        [
            "/etc/agentvm 700 root:root",
            "/etc/agentvm/env 600 root:root",
            "/run/agentvm/env 600 root:root",
            "/run/agentvm/env.systemd 600 root:root",
        ],
        "{modes}"
    );
    assert_eq!(
        env.ssh(
            "deb-lateenv",
            "setpriv --reuid=65534 --regid=65534 --clear-groups cat /etc/agentvm/env 2>&1 || true"
        ),
        "cat: /etc/agentvm/env: Permission denied\n"
    );

    // A rewrite while the guest runs: the changed value replaces the old one
    // and the variable that is gone is unset in the manager too.
    let written = Instant::now();
    write_through_agent(
        "deb-lateenv",
        "/etc/agentvm/env",
        "LATE_MODE=second value\n",
    );
    wait_for_output(&env, "deb-lateenv", &probe, "second value|\nsecond value|");
    eprintln!(
        "debian late env: the rewrite seen {:.1} s after the write began (agentvm-env-update.service ran {:.1} s)",
        written.elapsed().as_secs_f64(),
        last_update_run(&env, "deb-lateenv")
    );
    assert_eq!(
        env.ssh(
            "deb-lateenv",
            "systemctl is-failed agentvm-env.service agentvm-env-update.service agentvm-env.path || true"
        ),
        "active\ninactive\nactive\n"
    );
}

#[test]
fn stock_cloud_image_comes_up_through_its_nocloud_seed() {
    let env = Env::new();
    let image = debian_image("cloud");
    fleet(
        &env,
        &format!(
            "[images.cloud]\nfile = {:?}\ncloud_init = true\n",
            image.display().to_string()
        ),
        "[vms.deb-cloud]\nimage = \"cloud\"\ndisk = \"4GiB\"\nuser = \"agent\"\nenv = { TOKEN = \"cloud-secret\" }\n",
    );
    env.owns(&["deb-cloud"]);

    let started = Instant::now();
    let up = env.json(&["up", "deb-cloud", "--timeout", BOOT_TIMEOUT]);
    eprintln!(
        "debian cloud: up -> ssh-ready in {:.1} s ({:.1} s wall)",
        up[0]["ssh_ready_seconds"].as_f64().unwrap_or(-1.0),
        started.elapsed().as_secs_f64()
    );
    // cloud-init made the user with agentvm's key, named the host, grew the disk.
    assert_eq!(env.ssh("deb-cloud", "id -un"), "agent\n");
    assert_eq!(env.ssh("deb-cloud", "hostname"), "deb-cloud\n");
    assert_eq!(env.ssh("deb-cloud", "sudo -n true && echo sudo"), "sudo\n");
    let size: u64 = env
        .ssh("deb-cloud", "df -B1 --output=size / | tail -n1")
        .trim()
        .parse()
        .unwrap();
    assert!(size > 3 << 30, "root file system is {size} bytes");
    // The env file is root's alone.
    assert_eq!(
        env.ssh(
            "deb-cloud",
            "sudo stat -c '%a %U' /etc/agentvm/env && sudo cat /etc/agentvm/env"
        ),
        "600 root\nTOKEN=cloud-secret\n"
    );
    // agentvm-env.service runs after cloud-init.service and publishes the
    // file like the credential: root's login shells have it.
    assert_eq!(
        env.ssh(
            "deb-cloud",
            "sudo stat -c '%a %U' /etc/agentvm /run/agentvm/env && sudo -i printenv TOKEN"
        ),
        "700 root\n600 root\ncloud-secret\n"
    );
    // cloud-init found its seed and looked at no network datasource. (SSH
    // answers while cloud-init may still run its last stage, which only says
    // the datasource once done.)
    let result = env.ssh(
        "deb-cloud",
        "sudo timeout 300 cloud-init status --wait >/dev/null 2>&1; sudo cloud-init status --long || true",
    );
    assert!(result.contains("DataSourceNoCloud"), "{result}");
    // The seed on the host is private (it holds the env).
    let seed = env.home().join("vms/deb-cloud/cidata.img");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&seed).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let down = env.json(&["down", "deb-cloud", "--timeout", "120"]);
    assert_eq!(down[0]["stopped_by"], "agent", "{down}");
}
