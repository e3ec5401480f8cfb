//! The Proxmox backend and its API client against the in-repo fake Proxmox VE, which checks
//! every request against the real API schema (tests/pve/pve-api-schema-9.1.3.json).

mod common;
#[path = "lab/mod.rs"]
mod lab;
#[path = "pve/mod.rs"]
mod pve;

use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Env, EventFollower};
use lab::{Lab, REMOTE};
use pve::{DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET, FakeOptions, FakeVm};
use serde_json::Value;

fn create_pool(lab: &Lab) {
    lab.create_pool();
}

#[test]
fn up_clones_configures_and_starts_and_waiting_ignores_loopback() {
    let lab = Lab::new(FakeOptions::default(), REMOTE);
    create_pool(&lab);
    let up = lab.env.json(&["up", "remote", "--no-wait"]);
    assert_eq!(up[0]["action"], "created", "{up}");
    let (vmid, vm) = lab.vm("remote");
    assert!(vmid >= 100 && vmid != 9000);
    assert!(vm.running);
    assert_eq!(vm.config["cores"], "2");
    assert_eq!(vm.config["memory"], "2048");
    assert_eq!(vm.config["ciuser"], "agent");
    assert_eq!(vm.config["ipconfig0"], "ip=dhcp");
    assert!(vm.config["description"].starts_with("agentvm: managed\nspec-hash: sha256:"));
    let keys = &vm.config["sshkeys"];
    assert!(
        keys.contains("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBc+/user= me@laptop"),
        "{keys}"
    );
    assert_eq!(
        keys.lines().count(),
        2,
        "agentvm's key and the spec's: {keys}"
    );
    assert_eq!(vm.disk_size_gib, 16, "disk grown from the template's 8G");
    assert_eq!(vm.pool.as_deref(), Some("agents"));
    // The sshkeys went over the wire URL-encoded with %20, never '+'.
    let sent = lab
        .fake
        .requests()
        .into_iter()
        .find(|r| r.params.contains_key("sshkeys"))
        .unwrap();
    assert!(!sent.params["sshkeys"].contains('+') && sent.params["sshkeys"].contains("%20"));
    lab.no_violations();

    // Waiting: the agent answers 500 "not running" at first (retried), then
    // reports only loopback (lo) and link-local (eth0's fe80::, and the fake's
    // 127.0.0.1) addresses, which are ignored: there is nothing to SSH to.
    let err = lab.env.fails(&["up", "remote", "--timeout", "10"]);
    assert!(
        err.contains("the guest reports no routable address"),
        "{err}"
    );
    // The agent is pinged and asked for addresses at once; together they go
    // through the fake's two "not running" answers and then get through.
    let agent_calls: Vec<String> = lab
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/agent/"))
        .map(|r| r.path)
        .collect();
    assert!(
        agent_calls.len() >= 3,
        "asked through the agent's 500s: {agent_calls:?}"
    );
    assert!(
        agent_calls.iter().any(|p| p.ends_with("/agent/ping")),
        "{agent_calls:?}"
    );

    let status = lab.env.status("remote");
    assert_eq!(status["state"], "running");
    assert_eq!(status["backend"], "lab");
    assert_eq!(status["agent"], "ready");
    assert_eq!(status["ips"], serde_json::json!([]));
    let listed = lab.env.json(&["list"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "remote" && r["state"] == "running"),
        "{listed}"
    );
    // A second up finds it running.
    assert_eq!(
        lab.env.json(&["up", "remote", "--no-wait"])[0]["action"],
        "already-running"
    );
    // Capabilities Proxmox lacks here say so.
    let err = lab.env.fails(&["console", "remote", "--no-follow"]);
    assert!(
        err.contains("does not support a serial console log"),
        "{err}"
    );
    let err = lab.env.fails(&["forward", "remote", "8080:80"]);
    assert!(
        err.contains(
            "does not support port forwards: Proxmox VMs are reached on their own address; open the port in the guest's firewall"
        ),
        "{err}"
    );
    assert_eq!(lab.env.status("remote")["forwards"], serde_json::json!([]));
    let err = lab.env.fails(&["fork", "remote", "remote-copy"]);
    assert!(
        err.contains("does not support fork: make a linked clone with the backend's own tools (on Proxmox: qm clone VMID NEWID)"),
        "{err}"
    );

    // agentvm sets agent: 1, so `down` asks the guest agent first.
    let down = lab.env.json(&["down", "remote"]);
    assert_eq!(down[0]["stopped_by"], "agent", "{down}");
    lab.env.ok(&["destroy", "--yes", "remote"]);
    assert!(lab.fake.vms().values().all(|v| v.name != "remote"));
    let deleted =
        lab.fake.requests().into_iter().any(|r| {
            r.method == "DELETE" && r.params.get("purge").map(String::as_str) == Some("1")
        });
    assert!(deleted, "destroy purges");
    lab.no_violations();
}

#[test]
fn nextid_races_lock_timeouts_and_pinned_vmids() {
    let lab = Lab::new(
        FakeOptions {
            nextid_race: true,
            lock_timeout_once: true,
            ..FakeOptions::default()
        },
        &format!(
            "{REMOTE}\n[vms.pinned]\nbackend = \"lab\"\nvmid = 4242\n\n[vms.clash]\nbackend = \"lab\"\nvmid = 9000\n"
        ),
    );
    create_pool(&lab);
    lab.env.ok(&["up", "remote", "--no-wait"]);
    let (vmid, _) = lab.vm("remote");
    assert!(
        lab.fake.vms().values().any(|v| v.name == "someone-else"),
        "the race happened"
    );
    assert_ne!(lab.vm("someone-else").0, vmid);
    // The first config update met the lock timeout and was sent again.
    let config = format!("/nodes/pve/qemu/{vmid}/config");
    let updates = lab
        .fake
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == config)
        .count();
    assert_eq!(updates, 2, "the lock timeout was retried once");
    lab.env.ok(&["up", "pinned", "--no-wait"]);
    assert_eq!(lab.vm("pinned").0, 4242);
    let err = lab.env.fails(&["up", "clash", "--no-wait"]);
    assert!(err.contains("vmid = 9000 is already used"), "{err}");
    lab.no_violations();
}

#[test]
fn a_failed_clone_reports_the_task_log_and_leaves_nothing() {
    let lab = Lab::new(
        FakeOptions {
            fail_task: Some(("qmclone".into(), "clone failed: out of space".into())),
            ..FakeOptions::default()
        },
        REMOTE,
    );
    create_pool(&lab);
    let err = lab.env.fails(&["up", "remote", "--no-wait"]);
    assert!(err.contains("clone failed: out of space"), "{err}");
    assert!(lab.fake.vms().values().all(|v| v.name != "remote"));
    // The clone's target is purged: a real failed clone can leave a half-made VM behind.
    let newid = lab
        .fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/clone"))
        .map(|r| r.params["newid"].clone())
        .unwrap();
    assert!(
        lab.fake.requests().iter().any(|r| r.method == "DELETE"
            && r.path == format!("/nodes/pve/qemu/{newid}")
            && r.params.get("purge").map(String::as_str) == Some("1")),
        "no purge of vmid {newid}"
    );
    lab.no_violations();
}

#[test]
fn foreign_and_readonly_vms_are_protected() {
    let lab = Lab::new(
        FakeOptions::default(),
        &format!("{REMOTE}readonly = true\n\n[vms.foreign]\nbackend = \"lab\"\n"),
    );
    create_pool(&lab);
    lab.fake.put_vm(
        321,
        FakeVm {
            name: "foreign".into(),
            config: [("name".to_string(), "foreign".to_string())]
                .into_iter()
                .collect(),
            running: true,
            template: false,
            pool: None,
            disk_size_gib: 8,
            ..FakeVm::default()
        },
    );
    let err = lab.env.fails(&["destroy", "--yes", "foreign"]);
    assert!(err.contains("not created by agentvm"), "{err}");
    let err = lab.env.fails(&["up", "foreign", "--no-wait"]);
    assert!(err.contains("not created by agentvm"), "{err}");
    assert!(lab.fake.vms().contains_key(&321));

    lab.env.ok(&["up", "remote", "--no-wait"]);
    for verb in [vec!["down", "remote"], vec!["destroy", "--yes", "remote"]] {
        let err = lab.env.fails(&verb);
        assert!(err.contains("readonly"), "{err}");
    }
    assert!(lab.vm("remote").1.running);
    lab.no_violations();
}

#[test]
fn bad_tokens_and_missing_privileges_are_named() {
    let lab = Lab::new(
        FakeOptions {
            tokens: vec![(
                DEFAULT_TOKEN_ID.into(),
                DEFAULT_TOKEN_SECRET.into(),
                vec!["VM.Audit".into()],
            )],
            ..FakeOptions::default()
        },
        REMOTE,
    );
    let err = lab.env.fails(&["up", "remote", "--no-wait"]);
    assert!(
        err.contains("the token lacks privilege VM.")
            && err.contains("(403: Permission check failed"),
        "{err}"
    );
    let token = lab.env.dir.path().join("pve-token");
    std::fs::write(&token, format!("{DEFAULT_TOKEN_ID}=wrong-secret\n")).unwrap();
    let err = lab.env.fails(&["up", "remote", "--no-wait"]);
    assert!(err.contains("token rejected (401)"), "{err}");
    assert!(
        !err.contains("wrong-secret"),
        "the token is never shown: {err}"
    );
    std::fs::write(&token, "not a token\n").unwrap();
    let err = lab.env.fails(&["up", "remote", "--no-wait"]);
    assert!(err.contains("USER@REALM!TOKENID=SECRET"), "{err}");
}

#[test]
fn plan_shows_changes_and_changes_nothing() {
    let lab = Lab::new(FakeOptions::default(), REMOTE);
    create_pool(&lab);
    let plan = lab.env.json(&["plan", "remote"]);
    assert_eq!(plan[0]["create"], true, "{plan}");
    assert_eq!(plan[0]["resize"], "16GiB");
    assert!(
        lab.fake.vms().values().all(|v| v.name != "remote"),
        "plan created nothing"
    );
    lab.env.ok(&["up", "remote", "--no-wait"]);
    lab.env.ok(&["down", "--force", "remote"]);
    let fleet = std::fs::read_to_string(lab.env.fleet_path()).unwrap();
    lab.env
        .write_raw_fleet(&fleet.replace("memory = \"2GiB\"", "memory = \"4GiB\""));
    let before = lab.fake.requests().len();
    let plan = lab.env.json(&["plan", "remote"]);
    let changes = plan[0]["changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c["key"] == "memory" && c["old"] == "2048" && c["new"] == "4096"),
        "{plan}"
    );
    assert_eq!(plan[0]["start"], true);
    let writes = lab.fake.requests()[before..]
        .iter()
        .filter(|r| r.method != "GET")
        .count();
    assert_eq!(writes, 0, "plan only reads");
    lab.no_violations();
}

#[test]
fn bootstrap_user_makes_a_least_privilege_token() {
    let lab = Lab::new(FakeOptions::default(), REMOTE);
    let made = lab
        .env
        .json(&["proxmox", "bootstrap-user", "alice", "--backend", "lab"]);
    assert_eq!(made["user"], "alice@pve");
    assert_eq!(made["pool"], "pool-alice");
    let token = made["token"].as_str().unwrap();
    assert!(token.starts_with("alice@pve!agentvm="), "{made}");
    assert!(lab.fake.users().contains_key("alice@pve"));
    assert!(lab.fake.pools().contains_key("pool-alice"));
    let acl = lab.fake.acls();
    assert!(
        acl.iter()
            .any(|a| a.path == "/pool/pool-alice" && a.roleid == "PVEVMAdmin"),
        "{acl:?}"
    );
    lab.no_violations();
}

#[test]
fn up_backend_runs_a_local_spec_on_proxmox() {
    let lab = Lab::new(
        FakeOptions::default(),
        "[images.x]\nfile = \"x.qcow2\"\n\n[vms.moved]\nimage = \"x\"\n",
    );
    create_pool(&lab);
    let err = lab
        .env
        .fails(&["up", "moved", "--no-wait", "--backend", "nope"]);
    assert!(
        err.contains("no backend named \"nope\" (available: local, lab)"),
        "{err}"
    );
    let up = lab
        .env
        .json(&["up", "moved", "--no-wait", "--backend", "lab"]);
    assert_eq!(up[0]["action"], "created", "{up}");
    assert!(lab.vm("moved").1.running);
    lab.no_violations();
}

fn vms_named(lab: &Lab, name: &str) -> usize {
    lab.fake.vms().values().filter(|v| v.name == name).count()
}

fn clone_requests(lab: &Lab) -> usize {
    lab.fake
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/clone"))
        .count()
}

#[test]
fn two_concurrent_ups_of_one_proxmox_vm_make_one_clone() {
    // Tasks that take a few polls keep the first up busy while the second arrives.
    let lab = Lab::new(
        FakeOptions {
            task_polls: 3,
            ..FakeOptions::default()
        },
        &format!(
            "{REMOTE}\n{}",
            REMOTE.replace("[vms.remote]", "[vms.remote2]")
        ),
    );
    create_pool(&lab);
    let spawn = || {
        lab.env
            .command(&["up", "remote", "--no-wait", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let mut actions = Vec::new();
    for out in [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v[0]["backend"], "lab", "{v}");
        actions.push(v[0]["action"].as_str().unwrap().to_string());
    }
    actions.sort();
    assert_eq!(
        actions,
        ["already-running", "created"],
        "exactly one cloned"
    );
    assert_eq!(clone_requests(&lab), 1);
    assert_eq!(vms_named(&lab, "remote"), 1);
    // --no-block: a VM held by another operation fails at once, naming it.
    // Cloning remote2 holds it for several task polls; probing it meanwhile with
    // `down --no-block` finds it absent (before), busy (during) or stops it (after).
    let mut slow = lab
        .env
        .command(&["up", "remote2", "--no-wait"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let busy = loop {
        let out = lab.env.agentvm(&["down", "--no-block", "remote2"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if err.contains("busy: up since") || Instant::now() > deadline {
            break err;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(busy.contains("busy: up since"), "{busy}");
    assert!(slow.wait().unwrap().success());
    lab.no_violations();
}

#[test]
fn where_a_vm_was_made_is_remembered_on_the_backend_itself() {
    // The guest's agent answers from the start (nothing here waits for it).
    let lab = Lab::new(
        FakeOptions {
            agent_down_calls: 0,
            ..FakeOptions::default()
        },
        "[images.x]\nfile = \"x.qcow2\"\n\n[vms.roam]\nimage = \"x\"\n",
    );
    create_pool(&lab);
    let up = lab
        .env
        .json(&["up", "roam", "--no-wait", "--backend", "lab"]);
    assert_eq!(up[0]["action"], "created", "{up}");
    assert_eq!(up[0]["backend"], "lab", "{up}");

    // agentvm's own data folder is not the record: lose it, and the VM is still found.
    lab.env.ok(&["daemon", "--stop"]);
    std::fs::remove_dir_all(lab.env.home()).unwrap();
    let status = lab.env.status("roam");
    assert_eq!(status["backend"], "lab", "{status}");
    assert_eq!(status["state"], "running", "{status}");
    let plan = lab.env.json(&["plan", "roam"]);
    assert_eq!(plan[0]["backend"], "lab", "{plan}");
    assert_eq!(plan[0]["create"], false, "{plan}");

    // Verbs only the web UI offers say so, with the VM's web console.
    let (vmid, _) = lab.vm("roam");
    for (args, capability) in [
        (vec!["screenshot", "roam", "shot.png"], "screenshots"),
        (
            vec!["console", "roam", "--no-follow"],
            "a serial console log",
        ),
    ] {
        let err = lab.env.fails(&args);
        assert!(
            err.contains(&format!(
                "the proxmox backend does not support {capability}: open the web console: {}/?console=kvm&novnc=1&vmid={vmid}&vmname=roam&node=pve",
                lab.fake.url()
            )),
            "{args:?}: {err}"
        );
    }
    // --backend naming another backend than the VM's is refused.
    let err = lab
        .env
        .fails(&["up", "roam", "--no-wait", "--backend", "local"]);
    assert!(
        err.contains("roam already exists on backend lab, not local"),
        "{err}"
    );

    let down = lab.env.json(&["down", "roam"]);
    assert_eq!(down[0]["stopped_by"], "agent", "{down}");
    assert_eq!(lab.env.status("roam")["state"], "stopped");
    lab.env.ok(&["destroy", "--yes", "roam"]);
    assert!(lab.fake.vms().values().all(|v| v.name != "roam"));
    // Gone everywhere: the spec's own backend (local) answers for it again.
    let status = lab.env.status("roam");
    assert_eq!(status["state"], "absent", "{status}");
    assert_eq!(status["backend"], "local", "{status}");
    lab.no_violations();
}

#[test]
fn a_vm_on_two_backends_is_an_error_naming_both() {
    let guest = common::guest_dir();
    let images = format!(
        "[images.testguest]\nkernel = {:?}\ninitrd = {:?}\nfile = {:?}\ncmdline = \"console=ttyS0 quiet\"\n\n[vms.dup]\nimage = \"testguest\"\ncpus = 1\nmemory = \"256MiB\"\n",
        guest.join("vmlinuz").display().to_string(),
        guest.join("initrd.img").display().to_string(),
        guest.join("disk.qcow2").display().to_string(),
    );
    let lab = Lab::new(FakeOptions::default(), &images);
    create_pool(&lab);
    let with_lab = std::fs::read_to_string(lab.env.fleet_path()).unwrap();
    lab.env.owns(&["dup"]);
    lab.env
        .json(&["up", "dup", "--no-wait", "--backend", "lab"]);
    // Without [backends.lab] in the file, agentvm only sees the local backend,
    // where dup does not exist yet: it is made there too.
    lab.env.write_raw_fleet(&images);
    let local = lab.env.json(&["up", "dup", "--no-wait"]);
    assert_eq!(local[0]["backend"], "local", "{local}");
    lab.env.write_raw_fleet(&with_lab);
    for args in [
        vec!["status", "dup"],
        vec!["down", "dup"],
        vec!["destroy", "--yes", "dup"],
    ] {
        let err = lab.env.fails(&args);
        assert!(
            err.contains("dup exists on more than one backend (local and lab)"),
            "{args:?}: {err}"
        );
    }
    assert!(lab.fake.vms().values().any(|v| v.name == "dup"));
    lab.env.write_raw_fleet(&images);
    lab.env.ok(&["destroy", "--yes", "dup"]);
    lab.no_violations();
}

#[test]
fn a_backend_that_cannot_be_listed_is_named_and_its_vms_not_shown_absent() {
    let env = Env::new();
    let token = env.dir.path().join("pve-token");
    std::fs::write(
        &token,
        format!("{DEFAULT_TOKEN_ID}={DEFAULT_TOKEN_SECRET}\n"),
    )
    .unwrap();
    // Nothing listens on a port the test bound and closed again.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.write_raw_fleet(&format!(
        "[backends.gone]\nkind = \"proxmox\"\nendpoint = \"http://127.0.0.1:{port}\"\nnode = \"pve\"\ntoken = {{ file = {:?} }}\ntemplate = 9000\n\n[vms.far]\nbackend = \"gone\"\n",
        token.display().to_string()
    ));
    let out = env.agentvm(&["list", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("backend gone could not be listed"),
        "{stderr}"
    );
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        rows.as_array().unwrap().iter().all(|r| r["name"] != "far"),
        "far is not known to be absent: {rows}"
    );
}

#[test]
fn events_follow_a_proxmox_vm() {
    let lab = Lab::new(FakeOptions::default(), REMOTE);
    create_pool(&lab);
    let mut events = EventFollower::start(&lab.env, "remote");
    lab.env.ok(&["up", "remote", "--no-wait"]);
    for state in ["started", "stopped", "undefined"] {
        if state == "stopped" {
            lab.env.ok(&["down", "--force", "remote"]);
        } else if state == "undefined" {
            lab.env.ok(&["destroy", "--yes", "remote"]);
        }
        let event = events.wait_for(state);
        assert_eq!(event["backend"], "lab", "{event}");
    }
    lab.no_violations();
}

const CLONE: &str = "/nodes/pve/qemu/9000/clone";

#[test]
fn a_clone_whose_reply_is_lost_is_looked_for_not_sent_again() {
    let lab = Lab::new(FakeOptions::default(), REMOTE);
    create_pool(&lab);
    // PVE made the clone, but the reply never arrived in one piece.
    lab.fake
        .lose_next_reply("POST", CLONE, 502, "<html>Bad Gateway</html>");
    let up = lab.env.json(&["up", "remote", "--no-wait"]);
    assert_eq!(up[0]["action"], "created", "{up}");
    assert_eq!(clone_requests(&lab), 1, "the clone was not sent again");
    let (_, vm) = lab.vm("remote");
    assert!(vm.running);
    assert!(vm.config["description"].starts_with("agentvm: managed"));
    lab.env.ok(&["destroy", "--yes", "remote"]);

    // A 500 after which nothing exists: the clone is asked for again.
    lab.fake.fail_next(
        "POST",
        CLONE,
        500,
        "{\"data\":null,\"message\":\"internal error\"}",
    );
    let up = lab.env.json(&["up", "remote", "--no-wait"]);
    assert_eq!(up[0]["action"], "created", "{up}");
    assert_eq!(clone_requests(&lab), 3, "one lost, one refused, one made");
    assert_eq!(vms_named(&lab, "remote"), 1);
    lab.no_violations();
}
