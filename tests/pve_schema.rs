//! The Proxmox VE schema checker and the fake PVE server of `tests/pve/`.

#[path = "pve/mod.rs"]
mod pve;

use std::collections::BTreeMap;

use pve::http::{percent_encode, raw_call};
use pve::syntax::{compile_pattern, perl_to_rust};
use pve::{DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET, FakeOptions, FakePve, Schema, token_header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const CLONE: &str = "/nodes/pve/qemu/9000/clone";
const CONFIG: &str = "/nodes/pve/qemu/101/config";

fn auth() -> String {
    token_header(DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET)
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn check(method: &str, path: &str, pairs: &[(&str, &str)]) -> Result<(), String> {
    Schema::load().check(method, path, &params(pairs), Some(&auth()))
}

/// Asserts a rejection whose message contains every one of `words`.
fn rejected(method: &str, path: &str, pairs: &[(&str, &str)], words: &[&str]) {
    match check(method, path, pairs) {
        Ok(()) => panic!("{method} {path} {pairs:?} accepted, expected a rejection"),
        Err(e) => {
            for w in words {
                assert!(e.contains(w), "message {e:?} lacks {w:?}");
            }
        }
    }
}

fn accepted(method: &str, path: &str, pairs: &[(&str, &str)]) {
    if let Err(e) = check(method, path, pairs) {
        panic!("{method} {path} {pairs:?} rejected: {e}");
    }
}

#[test]
fn schema_loads_and_matches_templates() {
    let schema = Schema::load();
    assert!(schema.endpoints().count() > 400);
    let m = schema
        .match_path("/nodes/pve/qemu/101/status/current")
        .unwrap();
    assert_eq!(
        m.endpoint.template,
        "/nodes/{node}/qemu/{vmid}/status/current"
    );
    assert_eq!(m.path_params["vmid"], "101");
    assert!(schema.match_path("/nodes//qemu").is_none());
    assert!(schema.match_path("/nodes/pve/qemu/101/status").is_some());
    assert!(
        schema
            .match_path("/nodes/pve/qemu/101/status/bogus")
            .is_none()
    );
}

#[test]
fn a_literal_segment_beats_a_parameter() {
    // 9.1.3 has no two templates matching one path; a newer schema may.
    let schema = Schema::parse(
        r#"[{"path": "/cluster", "info": {}, "children": [
              {"path": "/cluster/{thing}", "info": {"GET": {}}},
              {"path": "/cluster/nextid", "info": {"GET": {}}}]}]"#,
    )
    .unwrap();
    let m = schema.match_path("/cluster/nextid").unwrap();
    assert_eq!(m.endpoint.template, "/cluster/nextid");
    assert!(m.path_params.is_empty());
    let m = schema.match_path("/cluster/other").unwrap();
    assert_eq!(m.endpoint.template, "/cluster/{thing}");
    assert_eq!(m.path_params["thing"], "other");
    assert!(Schema::parse("{}").is_err());
    assert!(Schema::parse("[]").is_err());
}

#[test]
fn unknown_path_and_wrong_method() {
    rejected(
        "GET",
        "/nodes/pve/qemu/101/bogus",
        &[],
        &["unknown API path"],
    );
    rejected("GET", "/cluster/nextid/extra", &[], &["unknown API path"]);
    rejected(
        "GET",
        CLONE,
        &[("newid", "101")],
        &["GET", CLONE, "method GET not allowed", "POST"],
    );
    rejected("POST", "/cluster/nextid", &[], &["method POST not allowed"]);
}

#[test]
fn good_clone_and_dhcp_ipconfig_pass() {
    accepted(
        "POST",
        CLONE,
        &[
            ("newid", "101"),
            ("name", "web-1"),
            ("full", "1"),
            ("pool", "agentvm"),
            ("storage", "local-lvm"),
            ("target", "pve"),
            ("description", "managed by agentvm"),
        ],
    );
    accepted("POST", CLONE, &[("newid", "101"), ("full", "false")]);
    accepted("PUT", CONFIG, &[("ipconfig0", "ip=dhcp")]);
    accepted(
        "POST",
        CONFIG,
        &[
            ("ipconfig1", "ip=10.0.0.2/24,gw=10.0.0.1"),
            ("ipconfig2", "ip6=auto"),
            ("cores", "4"),
            ("memory", "4096"),
            ("agent", "enabled=1,fstrim_cloned_disks=1"),
            ("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0"),
            ("ciuser", "agent"),
            ("delete", "ide2,net1"),
        ],
    );
    accepted("GET", "/cluster/nextid", &[]);
    accepted("GET", "/cluster/resources", &[("type", "vm")]);
    accepted(
        "PUT",
        "/nodes/pve/qemu/101/resize",
        &[("disk", "scsi0"), ("size", "+10G")],
    );
    accepted(
        "GET",
        "/nodes/pve/tasks/UPID:pve:00001001:00100064:65A0B0C0:qmclone:101:root@pam!agentvm:/status",
        &[],
    );
}

#[test]
fn missing_required_parameter() {
    rejected(
        "POST",
        CLONE,
        &[("name", "web-1")],
        &["POST", CLONE, "'newid'", "required"],
    );
    rejected(
        "PUT",
        "/nodes/pve/qemu/101/resize",
        &[("disk", "scsi0")],
        &["'size'", "required"],
    );
}

#[test]
fn integer_range_and_type() {
    rejected(
        "POST",
        CLONE,
        &[("newid", "99")],
        &["'newid'", "below minimum 100"],
    );
    rejected(
        "POST",
        CLONE,
        &[("newid", "1000000000")],
        &["'newid'", "above maximum"],
    );
    rejected(
        "POST",
        "/nodes/pve/qemu/99/clone",
        &[("newid", "101")],
        &["'vmid'", "minimum"],
    );
    rejected(
        "PUT",
        CONFIG,
        &[("cores", "four")],
        &["'cores'", "not an integer"],
    );
    rejected(
        "PUT",
        CONFIG,
        &[("cores", "0")],
        &["'cores'", "below minimum 1"],
    );
    rejected("PUT", CONFIG, &[("cores", "2.5")], &["not an integer"]);
}

#[test]
fn booleans_as_proxmox_parses_them() {
    for ok in ["0", "1", "true", "false", "yes", "off"] {
        accepted("POST", CLONE, &[("newid", "101"), ("full", ok)]);
    }
    rejected(
        "POST",
        CLONE,
        &[("newid", "101"), ("full", "2")],
        &["'full'", "not a boolean"],
    );
    rejected(
        "POST",
        CLONE,
        &[("newid", "101"), ("full", "")],
        &["not a boolean"],
    );
}

#[test]
fn enum_violation() {
    rejected(
        "POST",
        CLONE,
        &[("newid", "101"), ("format", "bogus")],
        &["'format'", "enum", "qcow2"],
    );
    rejected(
        "GET",
        "/cluster/resources",
        &[("type", "qemu")],
        &["'type'", "enum"],
    );
    rejected(
        "PUT",
        "/nodes/pve/qemu/101/resize",
        &[("disk", "sda"), ("size", "1G")],
        &["'disk'"],
    );
}

#[test]
fn max_length_exceeded() {
    let long = "x".repeat(8193);
    rejected(
        "PUT",
        CONFIG,
        &[("description", &long)],
        &["'description'", "maxLength 8192"],
    );
    accepted("PUT", CONFIG, &[("description", &"x".repeat(8192))]);
    let comment = "c".repeat(2049);
    rejected(
        "POST",
        "/access/users",
        &[("userid", "agentvm@pve"), ("comment", &comment)],
        &["'comment'", "maxLength 2048"],
    );
}

#[test]
fn pattern_and_format_violations() {
    // The schema's own pattern (Perl's `(?^:…)` rewritten).
    rejected(
        "POST",
        "/access/users/agentvm@pve/token/1bad",
        &[],
        &["'tokenid'", "pattern"],
    );
    accepted(
        "POST",
        "/access/users/agentvm@pve/token/agentvm",
        &[("privsep", "1")],
    );
    rejected(
        "PUT",
        "/nodes/pve/qemu/101/resize",
        &[("disk", "scsi0"), ("size", "ten")],
        &["'size'", "pattern"],
    );
    // Formats.
    rejected("GET", "/nodes/bad_node/qemu", &[], &["'node'", "pve-node"]);
    rejected(
        "POST",
        CLONE,
        &[("newid", "101"), ("storage", "9local")],
        &["'storage'", "pve-storage-id"],
    );
    rejected(
        "POST",
        CLONE,
        &[("newid", "101"), ("pool", "a pool")],
        &["'pool'", "pve-poolid"],
    );
    rejected(
        "POST",
        CLONE,
        &[("newid", "101"), ("name", "web_1")],
        &["'name'", "dns-name"],
    );
    rejected(
        "POST",
        "/access/users",
        &[("userid", "agentvm")],
        &["'userid'", "pve-userid"],
    );
    rejected(
        "PUT",
        CONFIG,
        &[("ipconfig0", "ip=10.0.0.2")],
        &["'ipconfig0'", "ipconfig"],
    );
    rejected("PUT", CONFIG, &[("ipconfig0", "dhcp")], &["'ipconfig0'"]);
    rejected(
        "PUT",
        CONFIG,
        &[("net0", "virtio=BC:24:11:00:00:01,bridge=vmbr0,speed=10")],
        &["'net0'", "speed"],
    );
    rejected(
        "PUT",
        CONFIG,
        &[("agent", "enabled=maybe")],
        &["'agent'", "enabled"],
    );
    rejected(
        "PUT",
        "/access/acl",
        &[
            ("path", "/"),
            ("roles", "PVEVMAdmin"),
            ("tokens", "agentvm@pve"),
        ],
        &["'tokens'", "pve-tokenid"],
    );
    accepted(
        "PUT",
        "/access/acl",
        &[
            ("path", "/vms"),
            ("roles", "PVEVMAdmin,PVEAuditor"),
            ("tokens", "agentvm@pve!agentvm"),
        ],
    );
}

#[test]
fn sshkeys_must_be_url_encoded_with_percent_20() {
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB+x/y= agent@host";
    rejected(
        "PUT",
        CONFIG,
        &[("sshkeys", key)],
        &["'sshkeys'", "urlencoded"],
    );
    let plus = key.replace(' ', "+");
    rejected(
        "PUT",
        CONFIG,
        &[("sshkeys", &plus)],
        &["'sshkeys'", "urlencoded"],
    );
    // '@', '/', '=' and '+' of the key must be escaped too.
    rejected(
        "PUT",
        CONFIG,
        &[("sshkeys", &key.replace(' ', "%20"))],
        &["'sshkeys'", "urlencoded"],
    );
    rejected(
        "PUT",
        CONFIG,
        &[("sshkeys", "ssh-ed25519%2")],
        &["urlencoded"],
    );
    accepted("PUT", CONFIG, &[("sshkeys", &percent_encode(key))]);
    assert!(percent_encode(key).contains("%20"));
    // Two keys, one per line.
    accepted(
        "PUT",
        CONFIG,
        &[("sshkeys", &percent_encode(&format!("{key}\n{key}")))],
    );
}

#[test]
fn unknown_and_indexed_parameters() {
    rejected(
        "POST",
        CLONE,
        &[("newid", "101"), ("bogus", "1")],
        &["'bogus'", "unknown parameter"],
    );
    rejected(
        "PUT",
        CONFIG,
        &[("ipconfig", "ip=dhcp")],
        &["'ipconfig'", "unknown"],
    );
    rejected("PUT", CONFIG, &[("ipconfig01", "ip=dhcp")], &["unknown"]);
    accepted(
        "PUT",
        CONFIG,
        &[("scsi30", "local-lvm:vm-101-disk-1,size=1G")],
    );
    // "n is 0 to 30" in the description.
    rejected(
        "PUT",
        CONFIG,
        &[("scsi31", "local-lvm:vm-101-disk-1")],
        &["'scsi31'", "unknown"],
    );
    accepted("PUT", CONFIG, &[("net3", "virtio,bridge=vmbr0")]);
    rejected(
        "POST",
        CLONE,
        &[("newid", "101"), ("vmid", "102")],
        &["'vmid'", "path says"],
    );
}

#[test]
fn authorization_header() {
    let schema = Schema::load();
    let p = params(&[("newid", "101")]);
    let e = schema.check("POST", CLONE, &p, None).unwrap_err();
    assert!(e.contains("Authorization") && e.contains("missing"), "{e}");
    for bad in [
        "PVEAPIToken=root@pam!agentvm",             // no secret
        "PVEAPIToken=root@pam=5a0c2d9e",            // no token name
        "PVEAPIToken=root!agentvm=5a0c2d9e",        // no realm
        "PVEAPIToken=root@pam!1x=5a0c2d9e",         // bad token name
        "PVEAPIToken root@pam!agentvm=5a0c2d9e",    // not '='
        "Bearer abc",                               // other scheme
        "PVEAPIToken=root@pam!agentvm=",            // empty secret
        "PVEAPIToken=root@pam!agentvm=5a0c 2d9e",   // whitespace
        "PVEAuthCookie=PVE:root@pam:65A0B0C0::abc", // a ticket cookie, not a token
    ] {
        let e = schema.check("POST", CLONE, &p, Some(bad)).unwrap_err();
        assert!(e.contains("Authorization"), "{bad}: {e}");
    }
    schema.check("POST", CLONE, &p, Some(&auth())).unwrap();
}

#[test]
fn tokens_refused_where_allowtoken_is_0() {
    rejected(
        "PUT",
        "/access/password",
        &[("userid", "agentvm@pve"), ("password", "correct horse")],
        &["allowtoken"],
    );
    rejected(
        "POST",
        "/access/ticket",
        &[("username", "root@pam"), ("password", "x")],
        &["allowtoken"],
    );
}

#[test]
fn every_schema_pattern_compiles() {
    let schema = Schema::load();
    let patterns = schema.parameter_patterns();
    // 45 distinct parameter patterns in 9.1.3: an empty set would make the next line vacuous.
    assert_eq!(patterns.len(), 45, "{patterns:#?}");
    assert_eq!(
        schema.uncompilable_patterns(),
        Vec::<(String, String)>::new(),
        "schema patterns the checker cannot translate: extend perl_to_rust"
    );
}

#[test]
fn perl_pattern_groups_are_translated() {
    assert_eq!(perl_to_rust("(?^:a)").unwrap(), "(?-imsx:a)");
    assert_eq!(
        perl_to_rust("x(?^i:a(?^:b))").unwrap(),
        "x(?i-msx:a(?-imsx:b))"
    );
    assert!(perl_to_rust("(?^u:a)").unwrap_err().contains("'u'"));
    assert!(perl_to_rust("(?^i)a").is_err());
    // Perl's `^` resets the flags: case-insensitivity ends with its group.
    let re = compile_pattern("(?^i:a)(?^:b)").unwrap();
    assert!(re.is_match("Ab") && !re.is_match("aB"));
    // Anchored as PVE's m/^$pattern$/, with `\0` as NUL.
    let re = compile_pattern(r"\w+=x(?:\0\w+=x)*").unwrap();
    assert!(re.is_match("a=x\0b=x"));
    assert!(!re.is_match("a=x\0") && !re.is_match(" a=x"));
}

#[test]
fn the_vnet_alias_pattern_is_checked() {
    // `[\(\)-_.\w\d\s]{0,256}`: `\)-_` is the range ')'..'_', case-insensitive. Compiled with
    // Unicode `\w` it exceeds the regex crate's default size limit.
    let vnet = |alias: &str| {
        Schema::load().check_params(
            "POST",
            "/cluster/sdn/vnets",
            &params(&[("vnet", "vnet1"), ("zone", "zone1"), ("alias", alias)]),
        )
    };
    for ok in ["VLAN 10 (prod)", "a+b=c;d@e[f]^_", "", "x_y.z"] {
        vnet(ok).unwrap_or_else(|e| panic!("{ok:?} rejected: {e}"));
    }
    for bad in ["a!b", "a{b}", "50%", "a~b"] {
        let e = vnet(bad).unwrap_err();
        assert!(
            e.contains("'alias'") && e.contains("pattern"),
            "{bad:?}: {e}"
        );
    }
    let e = vnet(&"a".repeat(257)).unwrap_err();
    assert!(e.contains("maxLength 256"), "{e}");
}

#[test]
fn the_vendored_schema_is_the_published_one() {
    // pve-docs 9.1.3 api-viewer/apidata.js without its JavaScript wrapper (tests/pve/README.md).
    // Replacing it is a deliberate change: update these with the new file.
    let bytes = std::fs::read(pve::schema::SCHEMA_PATH).unwrap();
    assert_eq!(bytes.len(), 1_219_638);
    assert_eq!(
        hex::encode(Sha256::digest(&bytes)),
        "1ec4166e67a5a3fff111107f534c47c7e923274f1b4675f8e407adaa024238e9"
    );
}

// ----- the fake server -----

fn call(pve: &FakePve, method: &str, path: &str, params: &[(&str, &str)]) -> (u16, Value) {
    raw_call(&pve.url(), method, path, params, Some(&pve.auth_header()))
}

fn data(pve: &FakePve, method: &str, path: &str, params: &[(&str, &str)]) -> Value {
    let (status, body) = call(pve, method, path, params);
    assert_eq!(status, 200, "{method} {path}: {body}");
    body["data"].clone()
}

/// Polls a task until it stops; returns its exit status.
fn wait_task(pve: &FakePve, upid: &str) -> String {
    for _ in 0..20 {
        let status = data(pve, "GET", &format!("/nodes/pve/tasks/{upid}/status"), &[]);
        if status["status"] == "stopped" {
            return status["exitstatus"].as_str().unwrap().to_string();
        }
        assert_eq!(status["status"], "running");
    }
    panic!("task {upid} never stopped");
}

#[test]
fn fake_pve_clone_config_start_agent_flow() {
    let pve = FakePve::start(FakeOptions {
        guest_ip: "127.0.0.1".into(),
        ..FakeOptions::default()
    });

    let newid = data(&pve, "GET", "/cluster/nextid", &[]);
    assert_eq!(newid, json!("100"));
    let newid = newid.as_str().unwrap().to_string();

    data(
        &pve,
        "POST",
        "/pools",
        &[("poolid", "agentvm"), ("comment", "agentvm VMs")],
    );
    let upid = data(
        &pve,
        "POST",
        CLONE,
        &[
            ("newid", &newid),
            ("name", "web-1"),
            ("pool", "agentvm"),
            ("full", "1"),
        ],
    );
    let upid = upid.as_str().unwrap().to_string();
    assert!(upid.starts_with("UPID:pve:"), "{upid}");
    // PVE files a clone task under the source VM.
    assert!(
        upid.ends_with(&format!(":qmclone:9000:{DEFAULT_TOKEN_ID}:")),
        "{upid}"
    );

    // Locked until the clone task has been seen to finish.
    let (status, body) = call(
        &pve,
        "PUT",
        &format!("/nodes/pve/qemu/{newid}/config"),
        &[("cores", "4")],
    );
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["message"], "VM is locked (clone)\n");
    assert_eq!(wait_task(&pve, &upid), "OK");
    assert_eq!(pve.tasks_polled()[&upid], 2);
    let log = data(&pve, "GET", &format!("/nodes/pve/tasks/{upid}/log"), &[]);
    assert_eq!(log.as_array().unwrap().last().unwrap()["t"], "TASK OK");

    let config_path = format!("/nodes/pve/qemu/{newid}/config");
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB+x/y= agent@host";
    let upid = data(
        &pve,
        "POST",
        &config_path,
        &[
            ("cores", "4"),
            ("memory", "4096"),
            ("ciuser", "agent"),
            ("sshkeys", &percent_encode(key)),
            ("ipconfig0", "ip=dhcp"),
            ("description", "managed by agentvm"),
        ],
    );
    assert_eq!(wait_task(&pve, upid.as_str().unwrap()), "OK");
    let vm = &pve.vms()[&newid.parse().unwrap()];
    assert_eq!(vm.config["sshkeys"], key);
    assert_eq!(vm.config["cores"], "4");
    assert_eq!(vm.pool.as_deref(), Some("agentvm"));
    assert!(!vm.template && !vm.config.contains_key("template"));
    let config = data(&pve, "GET", &config_path, &[]);
    assert_eq!(config["cores"], json!(4));
    assert_eq!(config["memory"], json!("4096"));
    assert_eq!(config["sshkeys"], json!(percent_encode(key)));
    assert_eq!(config["digest"].as_str().unwrap().len(), 40);

    let upid = data(
        &pve,
        "PUT",
        &format!("/nodes/pve/qemu/{newid}/resize"),
        &[("disk", "scsi0"), ("size", "+12G")],
    );
    assert_eq!(wait_task(&pve, upid.as_str().unwrap()), "OK");
    assert_eq!(pve.vms()[&newid.parse().unwrap()].disk_size_gib, 20);

    let start = data(
        &pve,
        "POST",
        &format!("/nodes/pve/qemu/{newid}/status/start"),
        &[],
    );
    assert_eq!(wait_task(&pve, start.as_str().unwrap()), "OK");
    let current = data(
        &pve,
        "GET",
        &format!("/nodes/pve/qemu/{newid}/status/current"),
        &[],
    );
    assert_eq!(current["status"], "running");
    assert_eq!(current["agent"], json!(1));

    let ping = format!("/nodes/pve/qemu/{newid}/agent/ping");
    for _ in 0..2 {
        let (status, body) = call(&pve, "POST", &ping, &[]);
        assert_eq!(status, 500, "{body}");
        assert_eq!(body["message"], "QEMU guest agent is not running\n");
    }
    assert_eq!(data(&pve, "POST", &ping, &[]), json!({ "result": {} }));
    let ifaces = data(
        &pve,
        "GET",
        &format!("/nodes/pve/qemu/{newid}/agent/network-get-interfaces"),
        &[],
    );
    let eth0 = &ifaces["result"][1];
    assert_eq!(eth0["name"], "eth0");
    assert_eq!(eth0["ip-addresses"][0]["ip-address"], "127.0.0.1");

    let resources = data(&pve, "GET", "/cluster/resources", &[("type", "vm")]);
    let mine = resources
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "web-1")
        .unwrap();
    assert_eq!(mine["pool"], "agentvm");
    assert_eq!(mine["status"], "running");

    let stop = data(
        &pve,
        "POST",
        &format!("/nodes/pve/qemu/{newid}/status/stop"),
        &[],
    );
    assert_eq!(wait_task(&pve, stop.as_str().unwrap()), "OK");
    let destroy = data(
        &pve,
        "DELETE",
        &format!("/nodes/pve/qemu/{newid}"),
        &[("purge", "1"), ("destroy-unreferenced-disks", "1")],
    );
    assert_eq!(wait_task(&pve, destroy.as_str().unwrap()), "OK");
    assert!(!pve.vms().contains_key(&newid.parse().unwrap()));

    assert_eq!(pve.violations(), Vec::<String>::new());
    assert!(
        pve.requests()
            .iter()
            .all(|r| r.token_id.as_deref() == Some(DEFAULT_TOKEN_ID))
    );
}

#[test]
fn fake_pve_rejects_bad_token_and_bad_params() {
    let pve = FakePve::start(FakeOptions::default());
    let wrong = token_header(DEFAULT_TOKEN_ID, "00000000-0000-4000-8000-000000000000");
    let (status, body) = raw_call(&pve.url(), "GET", "/cluster/nextid", &[], Some(&wrong));
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["message"], "authentication failure\n");
    assert!(
        pve.violations().is_empty(),
        "a wrong secret is no schema violation"
    );

    let (status, body) = call(&pve, "POST", CLONE, &[("newid", "99")]);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["errors"]["newid"]
            .as_str()
            .unwrap()
            .contains("minimum")
    );
    let violations = pve.violations();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].contains("newid"));

    let (status, _) = raw_call(&pve.url(), "GET", "/cluster/nextid", &[], None);
    assert_eq!(status, 401);
    assert_eq!(pve.violations().len(), 2);
    assert_eq!(pve.requests().len(), 3);
}

#[test]
fn fake_pve_privileges() {
    let pve = FakePve::start(FakeOptions {
        tokens: vec![(
            "agentvm@pve!agentvm".into(),
            "6d1f3e0a-1111-4222-8333-944455556666".into(),
            vec!["VM.Clone".into(), "VM.Audit".into()],
        )],
        ..FakeOptions::default()
    });
    let (status, body) = call(&pve, "POST", CLONE, &[("newid", "101")]);
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body["message"],
        "Permission check failed (/vms/101, VM.Allocate)\n"
    );
    let (status, body) = call(&pve, "POST", "/nodes/pve/qemu/9000/status/start", &[]);
    assert_eq!(status, 403);
    assert!(body["message"].as_str().unwrap().contains("VM.PowerMgmt"));
    assert!(pve.violations().is_empty());
}

#[test]
fn fake_pve_bootstrap_users_tokens_acl() {
    let pve = FakePve::start(FakeOptions::default());
    data(
        &pve,
        "POST",
        "/access/users",
        &[("userid", "agentvm@pve"), ("comment", "agentvm")],
    );
    data(
        &pve,
        "POST",
        "/access/roles",
        &[
            ("roleid", "AgentVM"),
            (
                "privs",
                "VM.Clone,VM.Allocate,VM.Audit,VM.PowerMgmt,Datastore.AllocateSpace",
            ),
        ],
    );
    let token = data(
        &pve,
        "POST",
        "/access/users/agentvm@pve/token/agentvm",
        &[("privsep", "1")],
    );
    assert_eq!(token["full-tokenid"], "agentvm@pve!agentvm");
    let secret = token["value"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 36);
    let header = token_header("agentvm@pve!agentvm", &secret);

    // No ACL yet: authenticated, but no privilege.
    let (status, _) = raw_call(
        &pve.url(),
        "POST",
        CLONE,
        &[("newid", "101")],
        Some(&header),
    );
    assert_eq!(status, 403);

    data(
        &pve,
        "PUT",
        "/access/acl",
        &[
            ("path", "/"),
            ("roles", "AgentVM"),
            ("tokens", "agentvm@pve!agentvm"),
            ("propagate", "1"),
        ],
    );
    assert_eq!(pve.acls().len(), 1);
    let (status, body) = raw_call(
        &pve.url(),
        "POST",
        CLONE,
        &[("newid", "101")],
        Some(&header),
    );
    assert_eq!(status, 200, "{body}");
    let (status, _) = call(
        &pve,
        "PUT",
        "/access/acl",
        &[("path", "/"), ("roles", "Nope"), ("users", "agentvm@pve")],
    );
    assert_eq!(status, 500);
    assert!(pve.violations().is_empty(), "{:?}", pve.violations());
}

#[test]
fn fake_pve_simulations() {
    let pve = FakePve::start(FakeOptions {
        nextid_race: true,
        lock_timeout_once: true,
        task_polls: 0,
        fail_task: Some((
            "qmstart".into(),
            "start failed: QEMU exited with code 1".into(),
        )),
        ..FakeOptions::default()
    });
    let id = data(&pve, "GET", "/cluster/nextid", &[]);
    let (status, body) = call(&pve, "POST", CLONE, &[("newid", id.as_str().unwrap())]);
    assert_eq!(status, 500);
    assert_eq!(
        body["message"],
        "unable to create VM 100: config file already exists\n"
    );
    assert_eq!(pve.vms()[&100].name, "someone-else");
    let id = data(&pve, "GET", "/cluster/nextid", &[]);
    assert_eq!(id, json!("101"));
    let upid = data(&pve, "POST", CLONE, &[("newid", "101")]);
    assert_eq!(wait_task(&pve, upid.as_str().unwrap()), "OK");

    let (status, body) = call(&pve, "PUT", "/nodes/pve/qemu/101/config", &[("cores", "2")]);
    assert_eq!(status, 500);
    assert_eq!(
        body["message"],
        "can't lock file '/var/lock/qemu-server/lock-101.conf' - got timeout\n"
    );
    assert_eq!(
        data(&pve, "PUT", "/nodes/pve/qemu/101/config", &[("cores", "2")]),
        Value::Null
    );

    let shrink = data(
        &pve,
        "PUT",
        "/nodes/pve/qemu/101/resize",
        &[("disk", "scsi0"), ("size", "4G")],
    );
    assert_eq!(
        wait_task(&pve, shrink.as_str().unwrap()),
        "shrinking disks is not supported"
    );

    let start = data(&pve, "POST", "/nodes/pve/qemu/101/status/start", &[]);
    assert_eq!(
        wait_task(&pve, start.as_str().unwrap()),
        "start failed: QEMU exited with code 1"
    );
    assert!(!pve.vms()[&101].running);
    let (status, body) = call(&pve, "POST", "/nodes/pve/qemu/101/agent/ping", &[]);
    assert_eq!(status, 500);
    assert_eq!(body["message"], "VM 101 is not running\n");
    assert!(pve.violations().is_empty(), "{:?}", pve.violations());
}

#[test]
fn fake_pve_records_unimplemented_endpoints() {
    let pve = FakePve::start(FakeOptions::default());
    let (status, _) = call(&pve, "GET", "/version", &[]);
    assert_eq!(status, 501);
    assert_eq!(pve.violations().len(), 1);
    assert!(pve.violations()[0].contains("not implemented"));
}

#[test]
fn fake_pve_pools() {
    let pve = FakePve::start(FakeOptions::default());
    data(&pve, "POST", "/pools", &[("poolid", "agentvm")]);
    let (status, body) = call(&pve, "POST", "/pools", &[("poolid", "agentvm")]);
    assert_eq!(
        (status, body["message"].as_str()),
        (500, Some("pool 'agentvm' already exists\n"))
    );
    assert_eq!(
        data(
            &pve,
            "PUT",
            "/pools",
            &[("poolid", "agentvm"), ("vms", "9000")]
        ),
        Value::Null
    );
    assert_eq!(pve.pools()["agentvm"].vms, [9000].into());
    let pool = data(&pve, "GET", "/pools", &[("poolid", "agentvm")]);
    assert_eq!(pool[0]["members"][0]["vmid"], json!(9000));
    assert!(pve.deprecated_calls().is_empty());
    data(
        &pve,
        "PUT",
        "/pools/agentvm",
        &[("vms", "9000"), ("delete", "1")],
    );
    assert!(pve.pools()["agentvm"].vms.is_empty());
    assert_eq!(
        pve.deprecated_calls().len(),
        1,
        "PUT /pools/{{poolid}} is deprecated"
    );
    data(&pve, "DELETE", "/pools", &[("poolid", "agentvm")]);
    assert!(pve.pools().is_empty());
    assert!(pve.violations().is_empty(), "{:?}", pve.violations());
}

#[test]
fn method_case_does_not_matter() {
    accepted("post", CLONE, &[("newid", "101")]);
}

#[test]
fn fake_pve_injected_replies() {
    let pve = FakePve::start(FakeOptions::default());
    pve.fail_next("POST", CLONE, 502, "<html>Bad Gateway</html>");
    // A request the schema refuses is refused as usual and leaves the fault pending.
    let (status, _) = call(&pve, "POST", CLONE, &[("newid", "99")]);
    assert_eq!(status, 400);
    let (status, body) = call(&pve, "POST", CLONE, &[("newid", "101")]);
    assert_eq!((status, body), (502, Value::Null), "not JSON");
    assert!(!pve.vms().contains_key(&101), "not carried out");
    // Only the next one.
    let upid = data(&pve, "POST", CLONE, &[("newid", "101")]);
    assert!(upid.as_str().unwrap().starts_with("UPID:pve:"));

    pve.lose_next_reply("POST", CLONE, 504, "");
    let (status, _) = call(&pve, "POST", CLONE, &[("newid", "102")]);
    assert_eq!(status, 504);
    // Carried out, and its task has ended: the clone is no longer locked.
    let vm = &pve.vms()[&102];
    assert!(!vm.config.contains_key("lock"), "{vm:?}");
    let tasks = data(
        &pve,
        "GET",
        "/nodes/pve/tasks",
        &[("typefilter", "qmclone")],
    );
    assert_eq!(tasks.as_array().unwrap().len(), 1, "{tasks}");
    assert_eq!(tasks[0]["status"], "OK");
    assert_eq!(pve.violations().len(), 1, "{:?}", pve.violations());
}

#[test]
fn fake_pve_task_list() {
    let pve = FakePve::start(FakeOptions::default());
    let first = data(&pve, "POST", CLONE, &[("newid", "101")]);
    let second = data(&pve, "POST", CLONE, &[("newid", "102")]);
    let list = |params: &[(&str, &str)]| -> Vec<String> {
        data(&pve, "GET", "/nodes/pve/tasks", params)
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["upid"].as_str().unwrap().to_string())
            .collect()
    };
    let (first, second) = (first.as_str().unwrap(), second.as_str().unwrap());
    assert_eq!(
        list(&[]),
        Vec::<String>::new(),
        "archive: stopped tasks only"
    );
    assert_eq!(list(&[("source", "all")]), [second, first], "newest first");
    assert_eq!(
        list(&[("source", "active"), ("vmid", "9000")]),
        [second, first]
    );
    assert_eq!(
        list(&[("source", "all"), ("vmid", "101")]),
        Vec::<String>::new()
    );
    assert_eq!(wait_task(&pve, first), "OK");
    assert_eq!(list(&[("typefilter", "qmclone")]), [first]);
    assert_eq!(
        list(&[("typefilter", "qmstart"), ("source", "all")]),
        Vec::<String>::new()
    );
    let done = &data(&pve, "GET", "/nodes/pve/tasks", &[("vmid", "9000")])[0];
    assert_eq!(done["status"], "OK");
    assert_eq!(done["type"], "qmclone");
    assert_eq!(done["id"], "9000");
    assert!(pve.violations().is_empty(), "{:?}", pve.violations());
}

#[test]
fn repeated_parameters_are_arrays_where_the_schema_says_so() {
    // PVE makes a repeated form parameter an array (the fake joins the items with NUL).
    let exec = "/nodes/pve/qemu/101/agent/exec";
    accepted("POST", exec, &[("command", "sh\0-c\0printf hi")]);
    accepted("POST", exec, &[("command", "true")]);
    rejected(
        "POST",
        "/nodes/pve/qemu/101/agent/file-write",
        &[("file", "/a\0/b"), ("content", "x")],
        &["parameter 'file'", "given more than once"],
    );
    // A `-list` format takes the items joined with commas, as PVE's RESTHandler does.
    accepted("PUT", CONFIG, &[("delete", "ciuser\0cipassword")]);
    let joined = Schema::load().normalize(
        "PUT",
        CONFIG,
        params(&[("delete", "ciuser\0cipassword"), ("name", "x")]),
    );
    assert_eq!(joined["delete"], "ciuser,cipassword");
    assert_eq!(joined["name"], "x");
}
