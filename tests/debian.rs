//! A real distribution guest: Debian 12 with systemd, OpenSSH and
//! qemu-guest-agent, booting from its qcow2 disk with GRUB (built by
//! `images/debian/build.sh`), and its cloud-init variant given a NoCloud seed.

mod common;

use std::time::Instant;

use common::{Env, debian_image};

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
    // cloud-init found its seed and looked at no network datasource.
    let result = env.ssh("deb-cloud", "sudo cloud-init status --long || true");
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
