//! The Proxmox API client on its own, without the CLI, against the in-repo fake Proxmox VE:
//! replies that are not JSON, task ids, and requests that must not be sent twice.

#[path = "pve/mod.rs"]
mod pve;

use agentvm::backend::proxmox::{Client, PveError, read_token};
use agentvm::progress::Silent;
use agentvm::spec::{ProxmoxSpec, TemplateRef, TlsMode, TokenSource};
use pve::{DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET, FakeOptions, FakePve};
use serde_json::Value;

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
