//! The fake PVE's cluster, guest agent, snapshots, storage, VM creation and SPICE endpoints,
//! driven over HTTP with `pve::raw_call`.

#[path = "pve/mod.rs"]
mod pve;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use pve::{
    FakeNode, FakeOptions, FakePve, FakeStorage, FakeVm, base64_encode, raw_call,
    raw_call_multipart, token_header,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn call(pve: &FakePve, method: &str, path: &str, params: &[(&str, &str)]) -> (u16, Value) {
    raw_call(&pve.url(), method, path, params, Some(&pve.auth_header()))
}

fn data(pve: &FakePve, method: &str, path: &str, params: &[(&str, &str)]) -> Value {
    let (status, body) = call(pve, method, path, params);
    assert_eq!(status, 200, "{method} {path}: {body}");
    body["data"].clone()
}

/// The error message of a failing call, after checking its status.
fn error(pve: &FakePve, method: &str, path: &str, params: &[(&str, &str)], status: u16) -> String {
    let (got, body) = call(pve, method, path, params);
    assert_eq!(got, status, "{method} {path}: {body}");
    body["message"].as_str().unwrap_or_default().to_string()
}

/// Polls a task on the node its UPID names until it stops; returns its exit status.
fn wait_task(pve: &FakePve, upid: &Value) -> String {
    let upid = upid.as_str().expect("a UPID");
    let node = upid.split(':').nth(1).unwrap();
    for _ in 0..20 {
        let status = data(
            pve,
            "GET",
            &format!("/nodes/{node}/tasks/{upid}/status"),
            &[],
        );
        if status["status"] == "stopped" {
            return status["exitstatus"].as_str().unwrap().to_string();
        }
    }
    panic!("task {upid} never stopped");
}

/// A fake whose agents answer at once, with a running VM 101 (agent on) on node `pve`.
fn with_running_vm(opts: FakeOptions) -> FakePve {
    let pve = FakePve::start(FakeOptions {
        agent_down_calls: 0,
        ..opts
    });
    let config: BTreeMap<String, String> = [
        ("name", "web"),
        ("agent", "1"),
        ("memory", "1024"),
        ("scsi0", "local-lvm:vm-101-disk-0,size=8G"),
        ("vga", "serial0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let vm = FakeVm {
        name: "web".into(),
        config,
        running: true,
        disk_size_gib: 8,
        ..FakeVm::default()
    };
    pve.put_vm(101, vm);
    pve
}

const AGENT: &str = "/nodes/pve/qemu/101/agent";

fn exec_until_exited(pve: &FakePve, pid: &str) -> Value {
    for _ in 0..200 {
        let status = data(pve, "GET", &format!("{AGENT}/exec-status"), &[("pid", pid)]);
        if status["exited"] == 1 {
            return status;
        }
        assert_eq!(status, serde_json::json!({ "exited": 0 }));
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("pid {pid} never exited");
}

#[test]
fn exec_runs_the_command_with_stdin_and_reports_once() {
    let pve = with_running_vm(FakeOptions::default());
    let script = "printf out; cat; printf err >&2; exit 3";
    let reply = data(
        &pve,
        "POST",
        &format!("{AGENT}/exec"),
        &[
            ("command", "sh"),
            ("command", "-c"),
            ("command", script),
            ("input-data", "+in"),
        ],
    );
    let pid = reply["pid"].as_i64().expect("a pid").to_string();
    let status = exec_until_exited(&pve, &pid);
    assert_eq!(
        status,
        serde_json::json!({
            "exited": 1, "exitcode": 3, "out-data": "out+in", "out-truncated": 0,
            "err-data": "err", "err-truncated": 0,
        })
    );
    // QGA forgets a process once it has reported it exited.
    let msg = error(
        &pve,
        "GET",
        &format!("{AGENT}/exec-status"),
        &[("pid", &pid)],
        500,
    );
    assert_eq!(msg, "Agent error: Invalid parameter 'pid'\n");

    // One value is an array of one; a signal is reported as such; no output, no out-data.
    let reply = data(
        &pve,
        "POST",
        &format!("{AGENT}/exec"),
        &[("command", "true")],
    );
    let status = exec_until_exited(&pve, &reply["pid"].to_string());
    assert_eq!(status, serde_json::json!({ "exited": 1, "exitcode": 0 }));
    let kill = [
        ("command", "sh"),
        ("command", "-c"),
        ("command", "kill -9 $$"),
    ];
    let reply = data(&pve, "POST", &format!("{AGENT}/exec"), &kill);
    let status = exec_until_exited(&pve, &reply["pid"].to_string());
    assert_eq!(status, serde_json::json!({ "exited": 1, "signal": 9 }));

    let msg = error(
        &pve,
        "POST",
        &format!("{AGENT}/exec"),
        &[("command", "/no/such")],
        500,
    );
    assert!(
        msg.starts_with("Agent error: Failed to execute child process"),
        "{msg}"
    );
    assert!(pve.violations().is_empty(), "{:?}", pve.violations());
}

#[test]
fn file_write_then_read_and_the_seeded_host_key() {
    let pve = with_running_vm(FakeOptions::default());
    let write = format!("{AGENT}/file-write");
    let read = format!("{AGENT}/file-read");
    let body = data(
        &pve,
        "POST",
        &write,
        &[("file", "/etc/agentvm/env"), ("content", "A=1\n")],
    );
    assert_eq!(body, Value::Null);
    assert_eq!(pve.guest_file(101, "/etc/agentvm/env").unwrap(), b"A=1\n");
    let reply = data(&pve, "GET", &read, &[("file", "/etc/agentvm/env")]);
    assert_eq!(
        reply,
        serde_json::json!({ "content": "A=1\n", "bytes-read": 4 })
    );

    // encode=0: the content is base64 already, and may be any bytes.
    let bytes = [0u8, 0xff, b'\n', 0xc3, 0xa9];
    let b64 = base64_encode(&bytes);
    data(
        &pve,
        "POST",
        &write,
        &[("file", "/root/bin"), ("content", &b64), ("encode", "0")],
    );
    assert_eq!(pve.guest_file(101, "/root/bin").unwrap(), bytes);
    let reply = data(
        &pve,
        "GET",
        &read,
        &[("file", "/root/bin"), ("decode", "0")],
    );
    assert_eq!(reply["content"], b64.as_str());
    let reply = data(&pve, "GET", &read, &[("file", "/root/bin"), ("count", "2")]);
    assert_eq!(
        reply,
        serde_json::json!({ "content": "\u{0}\u{ff}", "bytes-read": 2, "truncated": 1 })
    );
    let msg = error(
        &pve,
        "POST",
        &write,
        &[("file", "/root/x"), ("content", "a*"), ("encode", "0")],
        500,
    );
    assert_eq!(
        msg,
        "Agent error: Base64 data contains invalid characters\n"
    );
    // Perl's encode_base64 takes no character above U+00FF.
    let msg = error(
        &pve,
        "POST",
        &write,
        &[("file", "/root/x"), ("content", "\u{20ac}")],
        500,
    );
    assert!(
        msg.starts_with("Wide character in subroutine entry"),
        "{msg}"
    );

    pve.remove_guest_dir(101, "/etc/agentvm");
    assert_eq!(pve.guest_file(101, "/etc/agentvm/env"), None);
    let msg = error(
        &pve,
        "POST",
        &write,
        &[("file", "/etc/agentvm/env"), ("content", "x")],
        500,
    );
    assert_eq!(
        msg,
        "Agent error: failed to open file '/etc/agentvm/env' (mode: 'wb'): No such file or directory\n"
    );
    let msg = error(&pve, "GET", &read, &[("file", "/nope")], 500);
    assert_eq!(
        msg,
        "Agent error: failed to open file '/nope' (mode: 'r'): No such file or directory\n"
    );

    let key = data(
        &pve,
        "GET",
        &read,
        &[("file", "/etc/ssh/ssh_host_ed25519_key.pub")],
    );
    let line = key["content"].as_str().unwrap().trim();
    assert!(line.ends_with(" root@web"), "{line}");
    ssh_key::PublicKey::from_openssh(line).expect("a valid ed25519 public key");
    pve.put_vm(
        102,
        FakeVm {
            name: "other".into(),
            ..FakeVm::default()
        },
    );
    let other = pve
        .guest_file(102, "/etc/ssh/ssh_host_ed25519_key.pub")
        .unwrap();
    assert_ne!(other, line.as_bytes(), "unique per VM");
    pve.put_guest_file(101, "/srv/a/b", b"x");
    assert_eq!(
        data(&pve, "GET", &read, &[("file", "/srv/a/b")])["content"],
        "x"
    );
    assert!(pve.violations().is_empty(), "{:?}", pve.violations());
}

#[test]
fn agent_privileges_and_addresses() {
    let limited = "root@pam!audit";
    let pve = with_running_vm(FakeOptions {
        tokens: vec![
            (
                pve::DEFAULT_TOKEN_ID.into(),
                pve::DEFAULT_TOKEN_SECRET.into(),
                pve::all_privileges(),
            ),
            (
                limited.into(),
                "s3cret".into(),
                vec!["VM.GuestAgent.Audit".into()],
            ),
        ],
        ..FakeOptions::default()
    });
    let auth = token_header(limited, "s3cret");
    let as_limited = |method: &str, what: &str, params: &[(&str, &str)]| {
        raw_call(
            &pve.url(),
            method,
            &format!("{AGENT}/{what}"),
            params,
            Some(&auth),
        )
    };
    let (status, body) = as_limited("POST", "exec", &[("command", "true")]);
    assert_eq!(status, 403);
    assert_eq!(
        body["message"],
        "Permission check failed (/vms/101, VM.GuestAgent.Unrestricted)\n"
    );
    let (status, body) = as_limited("GET", "file-read", &[("file", "/etc/hostname")]);
    assert_eq!(status, 403);
    assert_eq!(
        body["message"],
        "Permission check failed (/vms/101, VM.GuestAgent.FileRead|VM.GuestAgent.Unrestricted)\n"
    );
    let (status, _) = as_limited("GET", "network-get-interfaces", &[]);
    assert_eq!(status, 200);

    pve.set_guest_ips(101, vec!["10.1.2.3".into(), "fd00::3".into()]);
    let reply = data(&pve, "GET", &format!("{AGENT}/network-get-interfaces"), &[]);
    let eth0: Vec<&str> = reply["result"][1]["ip-addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ip-address"].as_str().unwrap())
        .collect();
    assert_eq!(eth0, ["10.1.2.3", "fd00::3", "fe80::1"]);
    assert_eq!(reply["result"][0]["name"], "lo");
}

#[test]
fn a_hanging_agent_answers_after_the_hang_while_others_are_served() {
    let pve = with_running_vm(FakeOptions::default());
    pve.hang_agent(101, Duration::from_millis(1500));
    let (url, auth) = (pve.url(), pve.auth_header());
    let started = Instant::now();
    let hung = std::thread::spawn(move || {
        let params = [("command", "true")];
        let reply = raw_call(&url, "POST", &format!("{AGENT}/exec"), &params, Some(&auth));
        (reply, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    let quick = Instant::now();
    data(&pve, "GET", "/nodes/pve/qemu/101/status/current", &[]);
    data(&pve, "GET", "/cluster/resources", &[]);
    assert!(
        quick.elapsed() < Duration::from_millis(800),
        "served meanwhile"
    );
    let ((status, body), took) = hung.join().unwrap();
    assert_eq!(status, 500);
    assert_eq!(
        body["message"],
        "VM 101 qga command 'guest-exec' failed - got timeout\n"
    );
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    pve.hang_agent(101, Duration::ZERO);
    data(&pve, "POST", &format!("{AGENT}/ping"), &[]);
}

/// A qcow2 header (magic, version 3) declaring `size` bytes, and some data.
fn qcow2(size: u64) -> Vec<u8> {
    let mut image = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    image.resize(24, 0);
    image.extend_from_slice(&size.to_be_bytes());
    image.resize(4096, 7);
    image
}

fn upload(
    pve: &FakePve,
    storage: &str,
    fields: &[(&str, &str)],
    name: &str,
    bytes: &[u8],
) -> (u16, Value) {
    let path = format!("/nodes/pve/storage/{storage}/upload");
    raw_call_multipart(
        &pve.url(),
        &path,
        fields,
        name,
        bytes,
        Some(&pve.auth_header()),
    )
}

#[test]
fn upload_checks_the_checksum_and_create_imports_it() {
    let pve = FakePve::start(FakeOptions::default());
    let image = qcow2(3 << 30);
    let hex: String = Sha256::digest(&image)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let bad = "0".repeat(64);
    let fields = [
        ("content", "import"),
        ("checksum-algorithm", "sha256"),
        ("checksum", bad.as_str()),
    ];
    let (status, body) = upload(&pve, "local", &fields, "disk.qcow2", &image);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        wait_task(&pve, &body["data"]),
        format!("checksum mismatch: got '{hex}' != expect '{bad}'")
    );
    assert_eq!(pve.volume("local:import/disk.qcow2"), None);

    let fields = [
        ("content", "import"),
        ("checksum-algorithm", "sha256"),
        ("checksum", hex.as_str()),
    ];
    let (_, body) = upload(&pve, "local", &fields, "my disk.qcow2", &image);
    assert!(
        body["data"].as_str().unwrap().contains(":imgcopy::"),
        "{body}"
    );
    assert_eq!(wait_task(&pve, &body["data"]), "OK");
    assert_eq!(pve.volume("local:import/my_disk.qcow2").unwrap(), image);
    let list = data(
        &pve,
        "GET",
        "/nodes/pve/storage/local/content",
        &[("content", "import")],
    );
    assert_eq!(list[0]["volid"], "local:import/my_disk.qcow2");
    assert_eq!(list[0]["format"], "qcow2");
    assert_eq!(list[0]["size"], image.len());

    // Not a qcow2 inside: qemu-img refuses it in the task.
    let (_, body) = upload(
        &pve,
        "local",
        &[("content", "import")],
        "fake.qcow2",
        b"not qcow2",
    );
    assert_eq!(
        wait_task(&pve, &body["data"]),
        "failed to query file information with qemu-img"
    );
    let (status, body) = upload(&pve, "local-lvm", &[("content", "import")], "x.raw", b"x");
    assert_eq!(
        (status, body["message"].as_str()),
        (500, Some("can't upload to storage type 'lvmthin'\n"))
    );
    let (status, body) = upload(&pve, "local", &[("content", "import")], "x.exe", b"x");
    assert_eq!(status, 400);
    assert_eq!(
        body["errors"]["filename"],
        "invalid filename or wrong extension"
    );
    // A large upload goes through whole.
    let big = vec![5u8; 24 << 20];
    let (_, body) = upload(&pve, "local", &[("content", "import")], "big.raw", &big);
    assert_eq!(wait_task(&pve, &body["data"]), "OK");
    assert_eq!(pve.volume("local:import/big.raw").unwrap().len(), big.len());

    let upid = data(
        &pve,
        "POST",
        "/nodes/pve/qemu",
        &[
            ("vmid", "120"),
            ("name", "imported"),
            ("memory", "1024"),
            ("cores", "2"),
            ("agent", "1"),
            ("scsihw", "virtio-scsi-single"),
            (
                "scsi0",
                "local-lvm:0,import-from=local:import/my_disk.qcow2",
            ),
            ("ide2", "local-lvm:cloudinit"),
            ("net0", "virtio,bridge=vmbr0"),
            ("serial0", "socket"),
            ("vga", "serial0"),
            ("boot", "order=scsi0"),
            ("tags", "agentvm"),
        ],
    );
    assert_eq!(wait_task(&pve, &upid), "OK");
    let config = data(&pve, "GET", "/nodes/pve/qemu/120/config", &[]);
    assert_eq!(config["scsi0"], "local-lvm:vm-120-disk-0,size=3G");
    assert_eq!(config["ide2"], "local-lvm:vm-120-cloudinit,media=cdrom");
    assert!(
        config["net0"]
            .as_str()
            .unwrap()
            .starts_with("virtio=BC:24:11:"),
        "{config}"
    );
    assert_eq!(pve.vms()[&120].disk_size_gib, 3);
    assert!(
        pve.guest_file(120, "/etc/ssh/ssh_host_ed25519_key.pub")
            .is_some()
    );

    let upid = data(
        &pve,
        "POST",
        "/nodes/pve/qemu",
        &[
            ("vmid", "121"),
            ("scsi0", "local-lvm:0,import-from=local:import/nope.qcow2"),
        ],
    );
    assert_eq!(
        wait_task(&pve, &upid),
        "unable to create VM 121 - failed to stat '/var/lib/vz/import/nope.qcow2'"
    );
    assert!(!pve.vms().contains_key(&121));
    let msg = error(
        &pve,
        "POST",
        "/nodes/pve/qemu",
        &[
            ("vmid", "122"),
            (
                "scsi0",
                "local-lvm:8,import-from=local:import/my_disk.qcow2",
            ),
        ],
        400,
    );
    assert_eq!(msg, "Parameter verification failed.\n");

    // A stopped VM becomes a template; its disk a base image.
    let upid = data(&pve, "POST", "/nodes/pve/qemu/120/template", &[]);
    assert_eq!(wait_task(&pve, &upid), "OK");
    let config = data(&pve, "GET", "/nodes/pve/qemu/120/config", &[]);
    assert_eq!(config["scsi0"], "local-lvm:base-120-disk-0,size=3G");
    assert_eq!(config["template"], 1);
    let msg = error(&pve, "POST", "/nodes/pve/qemu/120/template", &[], 500);
    assert_eq!(msg, "you can't convert a template to a template\n");
    assert!(pve.violations().is_empty(), "{:?}", pve.violations());
}

#[test]
fn uploaded_volumes_are_deleted_by_their_volume_id() {
    let pve = FakePve::start(FakeOptions::default());
    for name in ["a.raw", "b.raw"] {
        let (_, body) = upload(&pve, "local", &[("content", "import")], name, b"disk");
        assert_eq!(wait_task(&pve, &body["data"]), "OK");
    }
    // The volume ID percent-encoded in the path, or as it is: PVE joins the rest of the
    // path below `content` into the volume.
    let upid = data(
        &pve,
        "DELETE",
        "/nodes/pve/storage/local/content/local%3Aimport%2Fa.raw",
        &[],
    );
    assert!(upid.as_str().unwrap().contains(":imgdel:local:"), "{upid}");
    assert_eq!(wait_task(&pve, &upid), "OK");
    assert_eq!(pve.volume("local:import/a.raw"), None);
    let upid = data(
        &pve,
        "DELETE",
        "/nodes/pve/storage/local/content/import/b.raw",
        &[],
    );
    assert_eq!(wait_task(&pve, &upid), "OK");
    assert_eq!(pve.volume("local:import/b.raw"), None);
    let upid = data(
        &pve,
        "DELETE",
        "/nodes/pve/storage/local/content/local:import/b.raw",
        &[],
    );
    assert_eq!(
        wait_task(&pve, &upid),
        "unlink '/var/lib/vz/import/b.raw' failed - No such file or directory"
    );
    let (status, body) = call(
        &pve,
        "DELETE",
        "/nodes/pve/storage/local/content/local-lvm:import/b.raw",
        &[],
    );
    assert_eq!(status, 400);
    assert_eq!(
        body["errors"]["volume"],
        "storage ID mismatch (local-lvm != local)"
    );
    assert!(pve.violations().is_empty(), "{:?}", pve.violations());
}

#[test]
fn a_chunked_upload_is_refused_as_pve_does() {
    let pve = FakePve::start(FakeOptions::default());
    let addr = pve.url().trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(&addr).unwrap();
    let head = format!(
        "POST /api2/json/nodes/pve/storage/local/upload HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: {}\r\nContent-Type: multipart/form-data; boundary=b\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        pve.auth_header()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 501"), "{reply}");
    assert!(
        reply.contains("chunked transfer encoding not supported"),
        "{reply}"
    );
    assert_eq!(pve.violations().len(), 1);
}

fn two_nodes(shared: bool) -> FakePve {
    let mut storages = FakeStorage::defaults("local-lvm");
    storages.push(FakeStorage::new("ceph", "rbd", &["images"], shared));
    FakePve::start(FakeOptions {
        nodes: vec![
            FakeNode::new("pve"),
            FakeNode {
                mem: 5 << 30,
                ..FakeNode::new("pve2")
            },
        ],
        storages,
        ..FakeOptions::default()
    })
}

#[test]
fn vms_answer_on_their_node_only_and_offline_nodes_fail_like_the_proxy() {
    let pve = two_nodes(true);
    let upid = data(
        &pve,
        "POST",
        "/nodes/pve/qemu/9000/clone",
        &[("newid", "101"), ("name", "a")],
    );
    assert_eq!(wait_task(&pve, &upid), "OK");
    pve.migrate(101, "pve2");
    let msg = error(&pve, "GET", "/nodes/pve/qemu/101/config", &[], 500);
    assert_eq!(
        msg,
        "Configuration file 'nodes/pve/qemu-server/101.conf' does not exist\n"
    );
    assert_eq!(
        data(&pve, "GET", "/nodes/pve2/qemu/101/config", &[])["name"],
        "a"
    );
    let listed = data(&pve, "GET", "/nodes/pve2/qemu", &[]);
    assert_eq!(listed.as_array().unwrap().len(), 1);

    // Tasks are asked for on the node that ran them.
    let upid = data(&pve, "POST", "/nodes/pve2/qemu/101/status/start", &[]);
    assert!(upid.as_str().unwrap().starts_with("UPID:pve2:"));
    let (status, body) = call(
        &pve,
        "GET",
        &format!("/nodes/pve/tasks/{}/status", upid.as_str().unwrap()),
        &[],
    );
    assert_eq!(
        (status, &body["errors"]["upid"]),
        (400, &Value::from("no such task"))
    );
    assert_eq!(wait_task(&pve, &upid), "OK");

    let nodes = data(&pve, "GET", "/nodes", &[]);
    assert_eq!(nodes[1]["node"], "pve2");
    assert_eq!(nodes[1]["mem"], 5u64 << 30);
    assert_eq!(nodes[1]["status"], "online");

    pve.set_node_online("pve2", false);
    let (status, body) = call(&pve, "GET", "/nodes/pve2/qemu/101/config", &[]);
    assert_eq!((status, body), (595, Value::Null));
    let resources = data(&pve, "GET", "/cluster/resources", &[]);
    let find = |id: &str| {
        resources
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(find("node/pve2")["status"], "offline");
    assert_eq!(find("node/pve")["status"], "online");
    assert_eq!(find("qemu/101")["status"], "unknown");
    assert_eq!(find("qemu/101")["node"], "pve2");
    assert_eq!(find("storage/pve2/local")["status"], "unknown");
    let msg = error(&pve, "GET", "/nodes/nowhere/qemu", &[], 500);
    assert!(msg.starts_with("hostname lookup 'nowhere' failed"), "{msg}");

    // A clone to another node needs shared storage.
    let msg = error(
        &pve,
        "POST",
        "/nodes/pve/qemu/9000/clone",
        &[("newid", "102"), ("target", "pve2")],
        500,
    );
    assert_eq!(
        msg,
        "can't clone VM to node 'pve2' (VM uses local storage)\n"
    );
    let full = [
        ("newid", "102"),
        ("target", "pve2"),
        ("full", "1"),
        ("storage", "local-lvm"),
    ];
    let msg = error(&pve, "POST", "/nodes/pve/qemu/9000/clone", &full, 500);
    assert_eq!(msg, "can't clone to non-shared storage 'local-lvm'\n");
    pve.put_vm(
        9001,
        FakeVm {
            name: "shared-template".into(),
            config: [(
                "scsi0".to_string(),
                "ceph:base-9001-disk-0,size=8G".to_string(),
            )]
            .into(),
            template: true,
            ..FakeVm::default()
        },
    );
    let upid = data(
        &pve,
        "POST",
        "/nodes/pve/qemu/9001/clone",
        &[("newid", "103"), ("target", "pve2")],
    );
    assert!(upid.as_str().unwrap().starts_with("UPID:pve:"));
    assert_eq!(pve.vms()[&103].node, "pve2");
    assert!(pve.violations().is_empty(), "{:?}", pve.violations());
}

#[test]
fn snapshots_roll_back_config_files_and_ram() {
    let pve = with_running_vm(FakeOptions::default());
    let snap = "/nodes/pve/qemu/101/snapshot";
    let upid = data(
        &pve,
        "POST",
        snap,
        &[
            ("snapname", "before"),
            ("vmstate", "1"),
            ("description", "first"),
        ],
    );
    assert!(upid.as_str().unwrap().contains(":qmsnapshot:101:"));
    assert_eq!(wait_task(&pve, &upid), "OK");
    let upid = data(&pve, "POST", snap, &[("snapname", "before")]);
    assert_eq!(
        wait_task(&pve, &upid),
        "snapshot name 'before' already used"
    );
    let msg = error(&pve, "POST", snap, &[("snapname", "current")], 500);
    assert_eq!(
        msg,
        "unable to use snapshot name 'current' (reserved name)\n"
    );
    let (status, _) = call(&pve, "POST", snap, &[("snapname", "9bad")]);
    assert_eq!(status, 400);
    assert_eq!(pve.violations().len(), 1);

    let list = data(&pve, "GET", snap, &[]);
    assert_eq!(list[0]["name"], "before");
    assert_eq!(list[0]["vmstate"], 1);
    assert_eq!(list[0]["description"], "first");
    assert_eq!(list[1]["name"], "current");
    assert_eq!(list[1]["parent"], "before");
    assert_eq!(list[1]["running"], 1);
    let config = data(&pve, "GET", &format!("{snap}/before/config"), &[]);
    assert_eq!(config["vmstate"], "local-lvm:vm-101-state-before");

    pve.put_guest_file(101, "/etc/agentvm/later", b"x");
    data(&pve, "POST", "/nodes/pve/qemu/101/status/stop", &[]);
    let upid = data(&pve, "POST", &format!("{snap}/before/rollback"), &[]);
    assert_eq!(wait_task(&pve, &upid), "OK");
    assert!(pve.vms()[&101].running, "RAM restored: running");
    assert_eq!(pve.guest_file(101, "/etc/agentvm/later"), None);

    let upid = data(&pve, "POST", snap, &[("snapname", "disk_only")]);
    assert_eq!(wait_task(&pve, &upid), "OK");
    let upid = data(&pve, "POST", &format!("{snap}/disk_only/rollback"), &[]);
    assert_eq!(wait_task(&pve, &upid), "OK");
    assert!(!pve.vms()[&101].running, "no RAM: stopped");
    let upid = data(
        &pve,
        "POST",
        &format!("{snap}/disk_only/rollback"),
        &[("start", "1")],
    );
    assert_eq!(wait_task(&pve, &upid), "OK");
    assert!(pve.vms()[&101].running);
    assert_eq!(
        pve.vms()[&101].snapshots["disk_only"].parent.as_deref(),
        Some("before")
    );

    let upid = data(&pve, "DELETE", &format!("{snap}/before"), &[]);
    assert_eq!(wait_task(&pve, &upid), "OK");
    assert_eq!(pve.vms()[&101].snapshots["disk_only"].parent, None);
    let upid = data(&pve, "DELETE", &format!("{snap}/nope"), &[]);
    assert_eq!(wait_task(&pve, &upid), "snapshot 'nope' does not exist");
    let upid = data(&pve, "POST", &format!("{snap}/nope/rollback"), &[]);
    assert_eq!(wait_task(&pve, &upid), "snapshot 'nope' does not exist");
}

#[test]
fn spiceproxy_needs_a_running_vm_with_a_spice_display() {
    let pve = with_running_vm(FakeOptions::default());
    let path = "/nodes/pve/qemu/101/spiceproxy";
    assert_eq!(error(&pve, "POST", path, &[], 500), "no spice port\n");
    data(&pve, "PUT", "/nodes/pve/qemu/101/config", &[("vga", "qxl")]);
    let vv = data(&pve, "POST", path, &[("proxy", "pve.example")]);
    assert_eq!(vv["type"], "spice");
    assert_eq!(vv["proxy"], "http://pve.example:3128");
    assert_eq!(vv["title"], "VM 101 - web");
    assert_eq!(vv["delete-this-file"], 1);
    assert!(vv["host"].as_str().unwrap().starts_with("pvespiceproxy:"));
    for key in [
        "password",
        "ca",
        "host-subject",
        "secure-attention",
        "release-cursor",
        "toggle-fullscreen",
    ] {
        assert!(vv[key].is_string(), "{key}: {vv}");
    }
    assert!(vv["tls-port"].is_u64());
    data(&pve, "POST", "/nodes/pve/qemu/101/status/stop", &[]);
    assert_eq!(error(&pve, "POST", path, &[], 500), "VM 101 not running\n");
}

#[test]
fn storages_are_listed_by_content() {
    let pve = FakePve::start(FakeOptions::default());
    let list = data(&pve, "GET", "/nodes/pve/storage", &[("content", "import")]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["storage"], "local");
    assert_eq!(list[0]["type"], "dir");
    let list = data(
        &pve,
        "GET",
        "/nodes/pve/storage",
        &[("content", "images"), ("format", "1")],
    );
    assert_eq!(list[0]["storage"], "local-lvm");
    assert_eq!(list[0]["formats"]["default"], "raw");
    let content = data(&pve, "GET", "/nodes/pve/storage/local-lvm/content", &[]);
    assert_eq!(content[0]["volid"], "local-lvm:base-9000-disk-0");
    assert_eq!(content[0]["vmid"], 9000);
    let (status, body) = call(&pve, "GET", "/nodes/pve/storage", &[("storage", "nope")]);
    assert_eq!(
        (status, &body["errors"]["storage"]),
        (400, &Value::from("No such storage."))
    );
}
