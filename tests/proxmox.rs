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

use agentvm::backend::proxmox::{Client, PveError, read_token};
use agentvm::progress::Silent;
use agentvm::spec::{ProxmoxSpec, TemplateRef, TlsMode, TokenSource};
use common::{Env, EventFollower};
use lab::{Lab, REMOTE};
use pve::{DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET, FakeOptions, FakePve, FakeVm};
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

// ----- the client against the fake, without the CLI -----

const CLONE: &str = "/nodes/pve/qemu/9000/clone";

/// A client for the fake with its default token (kept in the returned directory).
fn client(fake: &FakePve) -> (tempfile::TempDir, Client) {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(
        &token,
        format!("{DEFAULT_TOKEN_ID}={DEFAULT_TOKEN_SECRET}\n"),
    )
    .unwrap();
    let spec = ProxmoxSpec {
        endpoint: fake.url(),
        node: "pve".into(),
        token: TokenSource::File(token),
        template: Some(TemplateRef::Id(9000)),
        storage: None,
        pool: None,
        full_clone: false,
        tls: TlsMode::Verified,
        ssh_port: 22,
        import_storage: None,
        bridge: None,
    };
    let token = read_token("lab", &spec.token).unwrap();
    let client = Client::new("lab", &spec, &token).unwrap();
    (dir, client)
}

fn sent(fake: &FakePve, method: &str, path: &str) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.method == method && r.path == path)
        .count()
}

#[test]
fn client_replies_that_are_not_json_are_errors() {
    let fake = FakePve::start(FakeOptions::default());
    let (_dir, client) = client(&fake);

    fake.fail_next(
        "GET",
        "/cluster/nextid",
        200,
        "<html>\n<title>Login</title>",
    );
    match client.get("/cluster/nextid", &[]) {
        Err(e @ PveError::BadReply { status: 200, .. }) => {
            let text = e.to_string();
            assert!(
                text.starts_with("GET /cluster/nextid: HTTP 200: the reply is not JSON")
                    && text.contains(r#""<html>\n<title>Login</title>""#),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    fake.fail_next("GET", "/cluster/nextid", 200, r#"{"nodata": 1}"#);
    let e = client.get("/cluster/nextid", &[]).unwrap_err();
    assert!(e.to_string().contains(r#"has no "data""#), "{e}");
    assert_eq!(sent(&fake, "GET", "/cluster/nextid"), 2, "not retried");

    // A proxy's 502 page on a repeatable request is retried like any transient 5xx.
    fake.fail_next("GET", "/cluster/nextid", 502, "<html>Bad Gateway</html>");
    assert_eq!(
        client.get("/cluster/nextid", &[]).unwrap(),
        serde_json::json!("100")
    );
    assert_eq!(sent(&fake, "GET", "/cluster/nextid"), 4);
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[test]
fn client_wait_task_requires_a_upid() {
    let fake = FakePve::start(FakeOptions::default());
    let (_dir, client) = client(&fake);
    for (reply, shown) in [(Value::Null, "null"), (serde_json::json!("OK"), "\"OK\"")] {
        let e = client
            .wait_task(&reply, "configure", &Silent, "web-1")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "configure: Proxmox answered {shown} where a task id"
            )),
            "{e}"
        );
    }
    assert!(fake.requests().is_empty(), "nothing polled");

    let upid = client
        .post(CLONE, &[("newid", "101".into()), ("name", "web-1".into())])
        .unwrap();
    client.wait_task(&upid, "clone", &Silent, "web-1").unwrap();
    assert_eq!(fake.tasks_polled()[upid.as_str().unwrap()], 2);
    assert!(!fake.vms()[&101].config.contains_key("lock"));
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[test]
fn client_post_once_leaves_a_clone_with_a_lost_reply_to_the_caller() {
    let fake = FakePve::start(FakeOptions::default());
    let (_dir, client) = client(&fake);
    let clone = |newid: u32| [("newid", newid.to_string()), ("name", "web-1".to_string())];

    fake.lose_next_reply("POST", CLONE, 504, "<html>Gateway Time-out</html>");
    let e = client.post_once(CLONE, &clone(101)).unwrap_err();
    assert!(
        matches!(e, PveError::BadReply { status: 504, .. }) && e.outcome_unknown(),
        "{e:?}"
    );
    assert_eq!(sent(&fake, "POST", CLONE), 1, "sent once");
    assert_eq!(fake.vms()[&101].name, "web-1", "PVE did clone");

    // What the caller finds out before trying again: the VMID exists, unlocked, with its name,
    // and the clone task (filed under the template) ended well.
    let resources = client
        .get("/cluster/resources", &[("type", "vm".into())])
        .unwrap();
    let made = resources
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["vmid"] == 101)
        .unwrap_or_else(|| panic!("{resources}"));
    assert_eq!(made["name"], "web-1");
    assert!(made.get("lock").is_none(), "{made}");
    let tasks = client
        .get(
            "/nodes/pve/tasks",
            &[
                ("vmid", "9000".into()),
                ("typefilter", "qmclone".into()),
                ("source", "all".into()),
            ],
        )
        .unwrap();
    assert_eq!(tasks.as_array().unwrap().len(), 1, "{tasks}");
    assert_eq!(tasks[0]["status"], "OK");
    client
        .wait_task(&tasks[0]["upid"], "clone", &Silent, "web-1")
        .unwrap();

    // post, which retries transient 5xx, would have sent it again into "already exists".
    fake.lose_next_reply("POST", CLONE, 504, "<html>Gateway Time-out</html>");
    let e = client.post(CLONE, &clone(102)).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(sent(&fake, "POST", CLONE), 3);
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[test]
fn client_post_once_retries_the_lock_timeout() {
    let fake = FakePve::start(FakeOptions::default());
    let (_dir, client) = client(&fake);
    fake.fail_next(
        "POST",
        CLONE,
        500,
        r#"{"data":null,"message":"can't lock file '/var/lock/qemu-server/lock-9000.conf' - got timeout\n"}"#,
    );
    let upid = client.post_once(CLONE, &[("newid", "101".into())]).unwrap();
    assert!(upid.as_str().unwrap().starts_with("UPID:pve:"), "{upid}");
    assert_eq!(sent(&fake, "POST", CLONE), 2);
    assert!(fake.vms().contains_key(&101));

    // Any other 5xx is returned at once.
    fake.fail_next("POST", CLONE, 503, "Service Unavailable");
    let e = client
        .post_once(CLONE, &[("newid", "102".into())])
        .unwrap_err();
    assert!(e.outcome_unknown(), "{e}");
    assert_eq!(sent(&fake, "POST", CLONE), 3);
    assert!(!fake.vms().contains_key(&102));
}

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

// ----- image push -----

/// Images for `image push`: `base` (a qcow2 file beside the fleet file) and a
/// kernel image, with VMs of `base` on the lab backend.
const PUSHABLE: &str = "[images.base]\nfile = \"base.qcow2\"\n\n[images.kern]\nkernel = \"vmlinuz\"\n\n[vms.made]\nbackend = \"lab\"\nimage = \"base\"\n\n[vms.other]\nbackend = \"lab\"\nimage = \"base\"\n";

/// Writes the lab's `base.qcow2` (`mib` MiB virtual, so sizes give different
/// digests); returns its digest as agentvm writes it.
fn base_image(lab: &Lab, mib: u32) -> String {
    let path = lab.env.dir.path().join("base.qcow2");
    let _ = std::fs::remove_file(&path);
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(format!("{mib}M"))
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{out:?}");
    let data = std::fs::read(&path).unwrap();
    format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data))
    )
}

fn uploads(lab: &Lab) -> Vec<pve::Recorded> {
    lab.fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/upload"))
        .collect()
}

/// The VMs (templates included) of the fake besides the seeded template 9000.
fn made_vms(lab: &Lab) -> Vec<(u32, FakeVm)> {
    lab.fake
        .vms()
        .into_iter()
        .filter(|(vmid, _)| *vmid != 9000)
        .collect()
}

#[test]
fn image_push_makes_a_template_that_vms_of_the_image_clone_from() {
    let lab = Lab::new(FakeOptions::default(), PUSHABLE);
    create_pool(&lab);
    let digest = base_image(&lab, 64);
    let hex = digest.trim_start_matches("sha256:");
    let out = lab
        .env
        .agentvm(&["image", "push", "base", "--backend", "lab", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let pushed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let vmid = pushed["vmid"].as_u64().unwrap() as u32;
    assert_eq!(
        pushed,
        serde_json::json!({
            "image": "base", "backend": "lab", "vmid": vmid, "node": "pve",
            "digest": digest, "action": "pushed",
        })
    );
    // The upload's bytes were reported, for the CLI's progress bar.
    let size = std::fs::metadata(lab.env.dir.path().join("base.qcow2"))
        .unwrap()
        .len();
    let file = format!("agentvm-base-{}.qcow2", &hex[..12]);
    assert!(
        stderr.lines().any(|l| {
            let e: Value = serde_json::from_str(l).unwrap_or_default();
            e["event"] == "bytes"
                && e["label"] == format!("uploading {file}")
                && e["done"] == size
                && e["total"] == size
        }),
        "{stderr}"
    );

    // The upload: multipart (the fake refuses anything else there), with the sha256.
    let sent = uploads(&lab);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].path, "/nodes/pve/storage/local/upload");
    assert_eq!(sent[0].params["content"], "import");
    assert_eq!(sent[0].params["checksum-algorithm"], "sha256");
    assert_eq!(sent[0].params["checksum"], hex);
    assert_eq!(sent[0].params["filename"], file);

    let (_, template) = made_vms(&lab)
        .into_iter()
        .find(|(id, _)| *id == vmid)
        .unwrap();
    assert!(template.template);
    assert_eq!(template.name, "agentvm-base");
    assert_eq!(template.pool.as_deref(), Some("agents"));
    let c = &template.config;
    assert!(
        c["description"].starts_with(&format!(
            "agentvm: template\nimage: base\ndigest: {digest}\npushed: "
        )),
        "{c:?}"
    );
    assert_eq!(c["tags"], "agentvm");
    assert!(c["scsi0"].starts_with("local-lvm:base-"), "{c:?}");
    assert_eq!(c["scsihw"], "virtio-scsi-single");
    assert!(
        c["net0"].starts_with("virtio=") && c["net0"].contains("bridge=vmbr0"),
        "{c:?}"
    );
    assert!(c["ide2"].starts_with("local-lvm:") && c["ide2"].contains("cloudinit"));
    for (key, value) in [
        ("agent", "1"),
        ("ostype", "l26"),
        ("serial0", "socket"),
        ("vga", "qxl"),
        ("boot", "order=scsi0"),
    ] {
        assert_eq!(c[key], value, "{key}");
    }
    // The upload was deleted once the disk was imported.
    assert!(lab.fake.volume(&format!("local:import/{file}")).is_none());

    // VMs of the image clone from it; plan says which template and why.
    let plan = lab.env.json(&["plan", "other"]);
    let clone = plan[0]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == "clone")
        .unwrap()["new"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        clone.starts_with(&format!("template {vmid} on pve"))
            && clone.contains("image base as pushed at")
            && clone.contains(&digest[..19]),
        "{clone}"
    );
    lab.env.ok(&["up", "made", "--no-wait"]);
    assert!(
        lab.fake
            .requests()
            .iter()
            .any(|r| r.path == format!("/nodes/pve/qemu/{vmid}/clone")),
        "made was cloned from the pushed template"
    );
    assert!(lab.vm("made").1.running);
    lab.no_violations();
}

#[test]
fn pushing_an_unchanged_image_again_does_nothing_and_a_changed_one_is_used_next() {
    let lab = Lab::new(FakeOptions::default(), PUSHABLE);
    create_pool(&lab);
    let digest = base_image(&lab, 64);
    let first = lab.env.json(&["image", "push", "base", "--backend", "lab"]);
    let again = lab.env.json(&["image", "push", "base", "--backend", "lab"]);
    assert_eq!(again["action"], "unchanged", "{again}");
    assert_eq!(again["vmid"], first["vmid"]);
    assert_eq!(again["digest"], digest);
    assert_eq!(uploads(&lab).len(), 1, "no second upload");
    let text = lab.env.ok(&["image", "push", "base", "--backend", "lab"]);
    assert_eq!(
        text.trim(),
        format!(
            "base on lab: unchanged, template {} on node pve already holds digest {digest}",
            first["vmid"]
        )
    );

    // A changed image is a new template; the old one stays (linked clones need it),
    // and new VMs clone from the newest.
    let changed = base_image(&lab, 128);
    let second = lab.env.json(&["image", "push", "base", "--backend", "lab"]);
    assert_eq!(second["action"], "pushed");
    assert_eq!(second["digest"], changed);
    assert_ne!(second["vmid"], first["vmid"]);
    assert_eq!(uploads(&lab).len(), 2);
    let templates: Vec<u32> = made_vms(&lab)
        .into_iter()
        .filter(|(_, vm)| vm.template)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(templates.len(), 2, "{templates:?}");
    lab.env.ok(&["up", "made", "--no-wait"]);
    assert!(
        lab.fake
            .requests()
            .iter()
            .any(|r| r.path == format!("/nodes/pve/qemu/{}/clone", second["vmid"])),
        "made was cloned from the newest push"
    );
    lab.no_violations();
}

#[test]
fn a_push_needs_a_storage_with_import_content_and_names_what_there_is() {
    let lab = Lab::new(
        FakeOptions {
            storages: vec![
                pve::FakeStorage::new("local", "dir", &["iso", "vztmpl", "backup"], false),
                pve::FakeStorage::new("local-lvm", "lvmthin", &["images", "rootdir"], false),
            ],
            ..FakeOptions::default()
        },
        PUSHABLE,
    );
    create_pool(&lab);
    base_image(&lab, 64);
    let err = lab
        .env
        .fails(&["image", "push", "base", "--backend", "lab"]);
    assert!(
        err.contains("node pve has no active storage with \"import\" content")
            && err.contains("local (iso,vztmpl,backup), local-lvm (images,rootdir)")
            && err.contains("Datacenter → Storage → Edit → Content")
            && err.contains("pvesm set local --content iso,vztmpl,backup,import")
            && err.contains("backends.lab.import_storage"),
        "{err}"
    );
    let fleet = std::fs::read_to_string(lab.env.fleet_path()).unwrap();
    lab.env.write_raw_fleet(&fleet.replace(
        "storage = \"local-lvm\"\n",
        "storage = \"local-lvm\"\nimport_storage = \"tank\"\n",
    ));
    let err = lab
        .env
        .fails(&["image", "push", "base", "--backend", "lab"]);
    assert!(
        err.contains("backends.lab.import_storage: node pve has no storage \"tank\"")
            && err.contains("local (iso,vztmpl,backup)"),
        "{err}"
    );
    assert!(uploads(&lab).is_empty());
    assert!(made_vms(&lab).is_empty());
    lab.no_violations();
}

#[test]
fn a_push_that_fails_after_its_vm_was_made_leaves_nothing() {
    let lab = Lab::new(
        FakeOptions {
            fail_task: Some((
                "qmtemplate".into(),
                "can't make a template: disk busy".into(),
            )),
            ..FakeOptions::default()
        },
        PUSHABLE,
    );
    create_pool(&lab);
    base_image(&lab, 64);
    let err = lab
        .env
        .fails(&["image", "push", "base", "--backend", "lab"]);
    assert!(
        err.contains("image push failed at making VM")
            && err.contains("a template")
            && err.contains("can't make a template: disk busy"),
        "{err}"
    );
    assert!(made_vms(&lab).is_empty(), "{:?}", made_vms(&lab));
    let file = &uploads(&lab)[0].params["filename"];
    assert!(
        lab.fake.volume(&format!("local:import/{file}")).is_none(),
        "the upload was removed"
    );
    lab.no_violations();
}

#[test]
fn a_damaged_upload_is_said_plainly_and_leaves_nothing() {
    let lab = Lab::new(
        FakeOptions {
            // The first push stops at creating the VM, with the image in the store.
            fail_task: Some(("qmcreate".into(), "unable to create VM: no space".into())),
            ..FakeOptions::default()
        },
        PUSHABLE,
    );
    create_pool(&lab);
    let digest = base_image(&lab, 64);
    let err = lab
        .env
        .fails(&["image", "push", "base", "--backend", "lab"]);
    assert!(
        err.contains("image push failed at creating the VM that imports the disk")
            && err.contains("unable to create VM: no space"),
        "{err}"
    );
    assert!(made_vms(&lab).is_empty());
    // Damage the copy in the store: what is sent no longer has the recorded digest.
    let stored = lab
        .env
        .home()
        .join("images")
        .join(format!("{}.qcow2", digest.trim_start_matches("sha256:")));
    let mut data = std::fs::read(&stored).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    std::fs::set_permissions(&stored, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(&stored, &data).unwrap();
    let err = lab
        .env
        .fails(&["image", "push", "base", "--backend", "lab"]);
    assert!(
        err.contains("the upload arrived damaged")
            && err.contains("checksum mismatch")
            && err.contains("image push failed at uploading to storage local"),
        "{err}"
    );
    assert!(made_vms(&lab).is_empty());
    for upload in uploads(&lab) {
        let file = &upload.params["filename"];
        assert!(lab.fake.volume(&format!("local:import/{file}")).is_none());
    }
    lab.no_violations();
}

#[test]
fn kernel_images_local_pushes_and_unpushed_images_without_a_template_are_refused() {
    let lab = Lab::new(FakeOptions::default(), PUSHABLE);
    create_pool(&lab);
    base_image(&lab, 64);
    let err = lab
        .env
        .fails(&["image", "push", "kern", "--backend", "lab"]);
    assert!(err.contains("image kern boots a kernel directly"), "{err}");
    let err = lab
        .env
        .fails(&["image", "push", "base", "--backend", "local"]);
    assert!(
        err.contains("local VMs use the image store directly; no push needed"),
        "{err}"
    );
    let err = lab
        .env
        .fails(&["image", "push", "base", "--backend", "nope"]);
    assert!(err.contains("no backend named \"nope\""), "{err}");
    // Without the backend's template, a VM of an image not pushed says to push it.
    let fleet = std::fs::read_to_string(lab.env.fleet_path()).unwrap();
    lab.env
        .write_raw_fleet(&fleet.replace("template = \"nixos-template\"\n", ""));
    for verb in ["plan", "up"] {
        let err = lab.env.fails(&[verb, "made"]);
        assert!(
            err.contains("image base is not on backend lab: agentvm image push base --backend lab"),
            "{verb}: {err}"
        );
    }
    assert!(uploads(&lab).is_empty());
    assert!(made_vms(&lab).is_empty());
    lab.no_violations();
}

#[test]
fn a_push_goes_to_the_placement_node_and_its_vms_clone_there() {
    let busy = pve::FakeNode {
        mem: 20 << 30,
        ..pve::FakeNode::new("pve")
    };
    let lab = Lab::with_backend(
        FakeOptions {
            nodes: vec![busy, pve::FakeNode::new("pve2")],
            ..FakeOptions::default()
        },
        "node = \"auto\"\n",
        PUSHABLE,
    );
    create_pool(&lab);
    let digest = base_image(&lab, 64);
    let pushed = lab.env.json(&["image", "push", "base", "--backend", "lab"]);
    assert_eq!(pushed["node"], "pve2", "the node with the most free memory");
    let vmid = pushed["vmid"].as_u64().unwrap();
    assert_eq!(uploads(&lab)[0].path, "/nodes/pve2/storage/local/upload");
    assert_eq!(
        uploads(&lab)[0].params["checksum"],
        digest.trim_start_matches("sha256:")
    );
    lab.env.ok(&["up", "made", "--no-wait"]);
    assert!(
        lab.fake
            .requests()
            .iter()
            .any(|r| r.path == format!("/nodes/pve2/qemu/{vmid}/clone")),
        "cloned on the template's node"
    );
    assert_eq!(lab.vm("made").1.node, "pve2");
    lab.no_violations();
}
