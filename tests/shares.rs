//! Shared folders on the real Debian guest: virtio-fs served by a virtiofsd
//! agentvm runs, mounted by the time `up` returns, files seen both ways with the
//! guest user owning them in the guest and the host user on the host, read-only
//! shares enforced by virtiofsd, and a dead virtiofsd reported with its fix.
//! Bad input is refused naming the field, on the fast test guest.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::{Env, EventFollower, GUEST_TIMEOUT, debian_image};

const BOOT_TIMEOUT: &str = "600";

fn exec(env: &Env, vm: &str, script: &str) -> std::process::Output {
    env.agentvm(&["exec", vm, "--", "/bin/sh", "-c", script])
}

fn exec_ok(env: &Env, vm: &str, script: &str) -> String {
    let out = exec(env, vm, script);
    assert!(
        out.status.success(),
        "{script}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The pid of the virtiofsd whose socket path ends in `socket`.
fn virtiofsd_pid(socket: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(entry.path().join("cmdline")).ok()?;
            raw.split(|b| *b == 0)
                .any(|arg| arg.starts_with(b"--socket-path=") && arg.ends_with(socket.as_bytes()))
                .then_some(pid)
        })
}

#[test]
fn shares_both_ways_readonly_enforced_and_a_dead_server_reported() {
    let env = Env::new();
    let work = env.dir.path().join("site");
    let docs = env.dir.path().join("docs");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(work.join("from-host.txt"), "written on the host\n").unwrap();
    std::fs::write(docs.join("readme.txt"), "read me\n").unwrap();
    env.write_raw_fleet(&format!(
        "[images.debian]\nfile = {:?}\n\n[vms.sh-deb]\nimage = \"debian\"\ncpus = 2\nmemory = \"1GiB\"\n\
         shares = [{{ host = \"site\", guest = \"/work\" }}, {{ host = {:?}, guest = \"/docs/\", readonly = true }}]\n",
        debian_image("plain").display().to_string(),
        docs.display().to_string(),
    ));
    env.owns(&["sh-deb"]);
    let up = env.agentvm(&["up", "sh-deb", "--timeout", BOOT_TIMEOUT]);
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(up.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("shared {} at /work (virtiofs)", work.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains("at /docs (virtiofs, read-only)"),
        "{stderr}"
    );

    // Mounted by the time `up` returned: the host's file is there.
    assert_eq!(
        exec_ok(&env, "sh-deb", "cat /work/from-host.txt"),
        "written on the host\n"
    );
    assert_eq!(
        exec_ok(&env, "sh-deb", "findmnt -n -o FSTYPE,SOURCE /work"),
        "virtiofs agentvm0\n"
    );
    // The host user's files belong to the guest user (uid 1000 by default).
    assert_eq!(
        exec_ok(&env, "sh-deb", "stat -c %u:%g /work/from-host.txt"),
        "1000:1000\n"
    );

    // The guest writes; the host sees it, owned by the host user.
    exec_ok(
        &env,
        "sh-deb",
        "printf 'from the guest\\n' > /work/from-guest.txt && sync",
    );
    let written = work.join("from-guest.txt");
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        "from the guest\n"
    );
    let me = nix::unistd::getuid().as_raw();
    assert_eq!(std::fs::metadata(&written).unwrap().uid(), me);
    // A file the host changes after the mount is seen too.
    std::fs::write(work.join("later.txt"), "later\n").unwrap();
    assert_eq!(exec_ok(&env, "sh-deb", "cat /work/later.txt"), "later\n");

    // Read-only: readable, not writable, even after the guest remounts it
    // read-write (virtiofsd refuses, not only the guest's mount option).
    assert_eq!(exec_ok(&env, "sh-deb", "cat /docs/readme.txt"), "read me\n");
    let out = exec(&env, "sh-deb", "touch /docs/new.txt");
    assert!(!out.status.success());
    let out = exec(
        &env,
        "sh-deb",
        "mount -o remount,rw /docs; echo x > /docs/new.txt",
    );
    assert!(!out.status.success(), "a read-only share took a write");
    assert!(!docs.join("new.txt").exists());

    // status names the shares and their servers.
    let status = env.status("sh-deb");
    let shares = status["shares"].as_array().unwrap();
    assert_eq!(shares.len(), 2, "{status}");
    assert_eq!(shares[0]["guest"], "/work");
    assert_eq!(shares[0]["type"], "virtiofs");
    assert_eq!(shares[0]["server_running"], true);
    assert_eq!(shares[1]["readonly"], true);
    assert!(shares[0]["problem"].is_null());

    // A memory snapshot cannot hold the share devices: refused, saying what to do.
    let err = env.fails(&["snapshot", "sh-deb", "create"]);
    assert!(
        err.contains("cannot be snapshotted with its memory"),
        "{err}"
    );
    assert!(err.contains("agentvm down sh-deb"), "{err}");

    // `up` again on the running VM changes nothing and keeps the mounts.
    env.ok(&["up", "sh-deb", "--timeout", BOOT_TIMEOUT]);
    assert_eq!(exec_ok(&env, "sh-deb", "cat /work/later.txt"), "later\n");

    // A virtiofsd that dies is reported by status and events, with the fix.
    let mut events = EventFollower::start(&env, "sh-deb");
    let pid = virtiofsd_pid("sh-deb.agentvm0.sock").expect("the virtiofsd of /work runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let problem = events.wait_for_problem();
    assert!(problem.contains("guest I/O on /work hangs"), "{problem}");
    assert!(problem.contains("agentvm down --force sh-deb"), "{problem}");
    let status = env.status("sh-deb");
    assert_eq!(status["shares"][0]["server_running"], false, "{status}");
    assert!(
        status["shares"][0]["problem"]
            .as_str()
            .is_some_and(|p| p.contains("restarts")),
        "{status}"
    );
    drop(events);
    env.ok(&["down", "--force", "sh-deb"]);
    // The next start serves the share again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && env.status("sh-deb")["state"] != "stopped" {
        std::thread::sleep(Duration::from_millis(100));
    }
    env.ok(&["up", "sh-deb", "--timeout", BOOT_TIMEOUT]);
    assert_eq!(
        exec_ok(&env, "sh-deb", "cat /work/from-guest.txt"),
        "from the guest\n"
    );
}

#[test]
fn bad_shares_are_refused_naming_the_field() {
    let env = Env::new();
    env.write_fleet("[vms.sh-bad]\nshares = [{ host = \"missing\", guest = \"/work\" }]\n");
    env.owns(&["sh-bad"]);
    let err = env.fails(&["up", "sh-bad", "--timeout", GUEST_TIMEOUT]);
    assert!(err.contains("vms.sh-bad.shares[0].host"), "{err}");
    assert!(err.contains("missing"), "{err}");
    // Nothing is left behind by the refused start.
    assert_eq!(env.status("sh-bad")["state"], "absent");

    env.write_fleet("[vms.sh-bad]\nshares = [{ host = \".\", guest = \"work\" }]\n");
    let err = env.fails(&["status", "sh-bad"]);
    assert!(err.contains("vms.sh-bad.shares[0]"), "{err}");
    assert!(err.contains("not an absolute path"), "{err}");

    env.write_fleet(
        "[vms.sh-bad]\nshares = [{ host = \".\", guest = \"/work\" }, { host = \".\", guest = \"/work/\" }]\n",
    );
    let err = env.fails(&["status", "sh-bad"]);
    assert!(err.contains("vms.sh-bad.shares[1]"), "{err}");
    assert!(err.contains("also the guest path of shares[0]"), "{err}");

    env.write_fleet("[vms.sh-bad]\nshares = [{ host = \".\", guest = \"/w\", mode = 1 }]\n");
    let err = env.fails(&["status", "sh-bad"]);
    assert!(err.contains("unknown field `mode`"), "{err}");
}
