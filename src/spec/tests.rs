use super::*;

fn parse(text: &str) -> Result<Fleet, SpecError> {
    Fleet::parse(Path::new("/fleet/agentvm.toml"), text)
}

fn invalid(text: &str) -> (usize, String, String) {
    match parse(text) {
        Err(SpecError::Invalid {
            line,
            field,
            message,
            ..
        }) => (line, field, message),
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

const BASIC: &str = r#"
[defaults]
cpus = 4
memory = "4GiB"
image = "nixos"
ssh_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBc user@host"]

[images.nixos]
file = "images/nixos.qcow2"

[images.tiny]
kernel = "/boot/vmlinuz"
initrd = "/boot/initrd.img"
cmdline = "console=ttyS0"

[vms.drago]
memory = "8G"
disk = "20G"
ssh_port = 2300
purpose = "builds things"
env = { EDITOR = "vim" }

[vms.luce]
image = "tiny"
cpus = 1
readonly = true
user = "agent"
"#;

#[test]
fn resolves_defaults_and_overrides() {
    let fleet = parse(BASIC).unwrap();
    let drago = fleet.vm("drago").unwrap();
    assert_eq!(drago.cpus, 4);
    assert_eq!(drago.memory.bytes(), 8 * GIB);
    assert_eq!(drago.disk.unwrap().bytes(), 20 * GIB);
    assert_eq!(drago.image.as_ref().unwrap().as_str(), "nixos");
    assert_eq!(drago.ssh_port, Some(2300));
    assert_eq!(drago.user, "root");
    assert_eq!(drago.backend, "local");
    assert_eq!(drago.env["EDITOR"], "vim");
    assert_eq!(drago.ssh_keys.len(), 1);
    let luce = fleet.vm("luce").unwrap();
    assert_eq!(luce.cpus, 1);
    assert_eq!(luce.memory.bytes(), 4 * GIB);
    assert!(luce.readonly);
    assert_eq!(luce.user, "agent");
    assert_eq!(
        fleet.image_of(luce).unwrap().source,
        ImageSource::Kernel {
            kernel: "/boot/vmlinuz".into(),
            initrd: Some("/boot/initrd.img".into()),
            cmdline: Some("console=ttyS0".into()),
            disk: None,
        }
    );
    assert_eq!(
        fleet.image_of(drago).unwrap().source,
        ImageSource::File("/fleet/images/nixos.qcow2".into())
    );
}

#[test]
fn unknown_key_names_line_and_field() {
    let (line, field, message) =
        invalid("[images.a]\nfile = \"x\"\n[vms.a]\nimage = \"a\"\ncolour = \"red\"\n");
    assert_eq!(line, 5);
    assert_eq!(field, "vms.a.colour");
    assert!(message.contains("unknown field `colour`"), "{message}");
}

#[test]
fn wrong_type_names_field() {
    let (line, field, message) = invalid("[defaults]\ncpus = \"two\"\n");
    assert_eq!((line, field.as_str()), (2, "defaults.cpus"));
    assert!(message.contains("invalid type"), "{message}");
}

#[test]
fn bad_size_names_field() {
    let (line, field, message) = invalid("[vms.a]\nmemory = \"4XB\"\n");
    assert_eq!((line, field.as_str()), (2, "vms.a.memory"));
    assert!(message.contains("unknown unit"), "{message}");
    let (_, field, message) = invalid("[vms.a]\ndisk = 20\n");
    assert_eq!(field, "vms.a.disk");
    assert!(message.contains("string with a unit"), "{message}");
}

#[test]
fn bad_vm_name_names_line() {
    let (line, field, message) =
        invalid("[images.a]\nfile = \"x\"\n\n[vms.\"Bad_Name\"]\nimage = \"a\"\n");
    assert_eq!(line, 4);
    assert_eq!(field, "vms.Bad_Name");
    assert!(message.contains("invalid name"), "{message}");
}

#[test]
fn hostile_names_are_rejected() {
    for name in ["../../etc", "a'/>", "x\ny", "agentvm-a b"] {
        let text = format!("[images.a]\nfile = \"x\"\n[vms.{name:?}]\nimage = \"a\"\n");
        let (_, _, message) = invalid(&text);
        assert!(message.contains("invalid name"), "{name}: {message}");
    }
}

#[test]
fn unknown_image_is_an_error() {
    let (line, field, message) = invalid("[images.a]\nfile = \"x\"\n[vms.b]\nimage = \"nope\"\n");
    assert_eq!((line, field.as_str()), (4, "vms.b.image"));
    assert!(message.contains("unknown image \"nope\""), "{message}");
    let (_, field, _) = invalid("[vms.b]\ncpus = 1\n");
    assert_eq!(field, "vms.b.image");
}

#[test]
fn image_needs_exactly_one_source() {
    let (line, field, _) = invalid("[images.a]\nfile = \"x\"\nflake = \".#a\"\n");
    assert_eq!((line, field.as_str()), (1, "images.a"));
    invalid("[images.a]\n");
    invalid("[images.a]\nfile = \"x\"\ncmdline = \"quiet\"\n");
    invalid("[images.a]\nflake = \"nohash\"\n");
}

#[test]
fn flake_images_parse() {
    let fleet = parse(
        "[images.n]\nflake = \".#agent-base\"\n[images.r]\nflake = \"github:me/agents#base\"\n",
    )
    .unwrap();
    assert_eq!(
        fleet.images[&Name::new("n").unwrap()].source,
        ImageSource::Flake("/fleet/.#agent-base".into())
    );
    assert_eq!(
        fleet.images[&Name::new("r").unwrap()].source,
        ImageSource::Flake("github:me/agents#base".into())
    );
}

#[test]
fn kernel_image_may_have_a_disk() {
    let fleet = parse("[images.k]\nkernel = \"vmlinuz\"\nfile = \"disk.qcow2\"\n").unwrap();
    let ImageSource::Kernel { disk, kernel, .. } = &fleet.images[&Name::new("k").unwrap()].source
    else {
        panic!("kernel image expected")
    };
    assert_eq!(disk.as_deref(), Some(Path::new("/fleet/disk.qcow2")));
    assert_eq!(kernel, Path::new("/fleet/vmlinuz"));
}

#[test]
fn ranges_are_checked() {
    let (_, field, _) = invalid("[vms.a]\ncpus = 0\n");
    assert_eq!(field, "vms.a.cpus");
    let (_, field, _) = invalid("[vms.a]\nssh_port = 22\n");
    assert_eq!(field, "vms.a.ssh_port");
    let (_, field, _) = invalid("[vms.a]\nssh_port = 70000\n");
    assert_eq!(field, "vms.a.ssh_port");
}

#[test]
fn same_pinned_ports_are_an_error() {
    let (_, field, _) = invalid(
        "[images.a]\nfile = \"x\"\n[vms.a]\nimage = \"a\"\nssh_port = 3000\nspice_port = 3000\n",
    );
    assert_eq!(field, "vms.a.spice_port");
}

#[test]
fn bad_ssh_keys_and_users_are_errors() {
    let (_, field, _) = invalid(
        "[images.a]\nfile = \"x\"\n[vms.a]\nimage = \"a\"\nssh_keys = [\"ssh-ed25519 AAAA\\nevil\"]\n",
    );
    assert_eq!(field, "vms.a.ssh_keys");
    let (_, field, message) = invalid(
        "[images.a]\nfile = \"x\"\n[vms.a]\nimage = \"a\"\nssh_keys = [\"/nonexistent/key.pub\"]\n",
    );
    assert_eq!(field, "vms.a.ssh_keys");
    assert!(message.contains("/nonexistent/key.pub"), "{message}");
    let (_, field, _) =
        invalid("[images.a]\nfile = \"x\"\n[vms.a]\nimage = \"a\"\nuser = \"Root;rm\"\n");
    assert_eq!(field, "vms.a.user");
}

#[test]
fn ssh_key_files_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pub");
    std::fs::write(&key, "# mine\nssh-ed25519 AAAAC3Nza me@x\n\n").unwrap();
    let text = format!(
        "[defaults]\nssh_keys = [{:?}]\n[images.a]\nfile = \"x\"\n[vms.a]\nimage = \"a\"\n",
        key.display().to_string()
    );
    let fleet = parse(&text).unwrap();
    assert_eq!(
        fleet.vm("a").unwrap().ssh_keys,
        vec!["ssh-ed25519 AAAAC3Nza me@x"]
    );
}

#[test]
fn unknown_backend_is_an_error() {
    let (_, field, message) = invalid(
        "[images.a]\nfile = \"x\"\n[defaults]\nbackend = \"pve\"\n[vms.a]\nimage = \"a\"\n",
    );
    assert_eq!(field, "defaults.backend");
    assert!(message.contains("unknown backend"), "{message}");
}

#[test]
fn syntax_errors_carry_a_line() {
    let (line, _, _) = invalid("[vms.a]\ncpus = = 2\n");
    assert_eq!(line, 2);
}

#[test]
fn unknown_vm_lists_known_ones() {
    let fleet = parse(BASIC).unwrap();
    let err = fleet.vm("nope").unwrap_err().to_string();
    assert!(err.contains("drago, luce"), "{err}");
}

#[test]
fn error_display_is_file_line_field() {
    let err = parse("[vms.a]\nmemory = \"4XB\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("/fleet/agentvm.toml:2:10: vms.a.memory: invalid size"),
        "{err}"
    );
}

#[test]
fn control_characters_are_rejected() {
    let (_, field, _) =
        invalid("[images.a]\nfile = \"x\"\n[vms.a]\nimage = \"a\"\npurpose = \"a\\u0000b\"\n");
    assert_eq!(field, "vms.a.purpose");
    let (_, field, _) = invalid("[images.a]\nkernel = \"k\"\ncmdline = \"a\\u001bb\"\n");
    assert_eq!(field, "images.a");
    let fleet = parse(
        "[images.a]\nfile = \"x\"\n[vms.a]\nimage = \"a\"\npurpose = \"line one\\nline two\"\n",
    )
    .unwrap();
    assert_eq!(
        fleet.vm("a").unwrap().purpose.as_deref(),
        Some("line one\nline two")
    );
}

#[test]
fn images_have_agent_and_host_key_settings() {
    let fleet = parse("[images.a]\nfile = \"x\"\n[images.b]\nfile = \"y\"\nagent = false\nhost_key = \"/etc/ssh/ssh_host_rsa_key.pub\"\n").unwrap();
    let a = &fleet.images[&Name::new("a").unwrap()];
    assert!(a.agent);
    assert_eq!(a.host_key, DEFAULT_HOST_KEY);
    let b = &fleet.images[&Name::new("b").unwrap()];
    assert!(!b.agent);
    assert_eq!(b.host_key, "/etc/ssh/ssh_host_rsa_key.pub");
    let (_, field, _) = invalid("[images.a]\nfile = \"x\"\nhost_key = \"relative.pub\"\n");
    assert_eq!(field, "images.a.host_key");
}

const PROXMOX: &str = r#"
[backends.homelab]
kind = "proxmox"
endpoint = "https://pve.lan:8006"
node = "pve"
token = { env = "PVE_TOKEN" }
template = 9000
storage = "local-lvm"
pool = "agents"
tls = { fingerprint = "aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99" }

[vms.remote]
backend = "homelab"
vmid = 4242
"#;

#[test]
fn proxmox_backends_parse_and_vms_need_no_image_there() {
    let fleet = parse(PROXMOX).unwrap();
    let backend = &fleet.backends[&Name::new("homelab").unwrap()].proxmox;
    assert_eq!(backend.endpoint, "https://pve.lan:8006");
    assert_eq!(backend.template, Some(TemplateRef::Id(9000)));
    assert_eq!(backend.import_storage, None);
    assert_eq!(backend.bridge, None);
    assert_eq!(backend.token, TokenSource::Env("PVE_TOKEN".into()));
    assert!(
        matches!(&backend.tls, TlsMode::Fingerprint(fp) if fp.starts_with("AABBCC") && fp.len() == 64)
    );
    assert!(!backend.full_clone);
    assert_eq!(backend.ssh_port, 22);
    let vm = fleet.vm("remote").unwrap();
    assert_eq!(vm.backend, "homelab");
    assert_eq!(vm.vmid, Some(4242));
    assert_eq!(vm.image, None);
}

#[test]
fn proxmox_backend_errors_name_the_field() {
    let plain = PROXMOX.replace("https://pve.lan:8006", "http://pve.lan:8006");
    let (_, field, message) = invalid(&plain);
    assert_eq!(field, "backends.homelab.endpoint");
    assert!(message.contains("only allowed for loopback"), "{message}");
    assert!(parse(&PROXMOX.replace("https://pve.lan:8006", "http://127.0.0.1:8006")).is_ok());
    let (_, field, _) = invalid(&PROXMOX.replace("kind = \"proxmox\"", "kind = \"vmware\""));
    assert_eq!(field, "backends.homelab.kind");
    let (_, field, _) = invalid(&PROXMOX.replace("{ env = \"PVE_TOKEN\" }", "{ }"));
    assert_eq!(field, "backends.homelab.token");
    let (_, field, _) = invalid(&PROXMOX.replace("aa:bb:cc", "zz:bb:cc"));
    assert_eq!(field, "backends.homelab.fingerprint");
    let (_, field, message) =
        invalid(&PROXMOX.replace("backend = \"homelab\"", "backend = \"nope\""));
    assert_eq!(field, "vms.remote.backend");
    assert!(message.contains("local, homelab"), "{message}");
    let (_, field, _) = invalid(&PROXMOX.replace("vmid = 4242", "vmid = 7"));
    assert_eq!(field, "vms.remote.vmid");
}

#[test]
fn proxmox_template_is_optional_and_push_settings_parse() {
    let pushing = PROXMOX.replace(
        "template = 9000\n",
        "import_storage = \"local\"\nbridge = \"vmbr1\"\n",
    );
    let fleet = parse(&pushing).unwrap();
    let backend = &fleet.backends[&Name::new("homelab").unwrap()].proxmox;
    assert_eq!(backend.template, None);
    assert_eq!(backend.import_storage.as_deref(), Some("local"));
    assert_eq!(backend.bridge.as_deref(), Some("vmbr1"));
    let (_, field, message) = invalid(&pushing.replace("\"local\"", "\"Local Disk\""));
    assert_eq!(field, "backends.homelab.import_storage");
    assert!(message.contains("storage ID"), "{message}");
    let (_, field, _) = invalid(&pushing.replace("\"vmbr1\"", "\"vmbr 1\""));
    assert_eq!(field, "backends.homelab.bridge");
}

#[test]
fn unset_push_settings_leave_the_serialized_backend_as_it_was() {
    // VMs' spec hashes on Proxmox cover these settings: a fleet file without
    // the new keys must serialize (and so hash) as before they existed.
    let fleet = parse(PROXMOX).unwrap();
    let backend = &fleet.backends[&Name::new("homelab").unwrap()].proxmox;
    let json = serde_json::to_value(backend).unwrap();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "endpoint",
            "full_clone",
            "node",
            "pool",
            "ssh_port",
            "storage",
            "template",
            "tls",
            "token"
        ]
    );
    assert_eq!(json["template"], serde_json::json!({"id": 9000}));
}

const PASS: &str = r#"
[defaults]
image = "tiny"
pass_env = ["ANTHROPIC_API_KEY", "GITHUB_TOKEN"]

[images.tiny]
kernel = "/boot/vmlinuz"

[vms.drago]
env = { EDITOR = "vim" }

[vms.luce]
pass_env = ["ONLY_THIS"]
"#;

#[test]
fn pass_env_comes_from_defaults_or_the_vm() {
    let fleet = parse(PASS).unwrap();
    assert_eq!(
        fleet.vm("drago").unwrap().pass_env,
        ["ANTHROPIC_API_KEY", "GITHUB_TOKEN"]
    );
    assert_eq!(fleet.vm("luce").unwrap().pass_env, ["ONLY_THIS"]);
}

#[test]
fn pass_env_values_come_from_the_lookup_and_unset_ones_are_named() {
    let fleet = parse(PASS).unwrap();
    let drago = fleet.vm("drago").unwrap().clone();
    let lookup = |var: &str| match var {
        "ANTHROPIC_API_KEY" => Some("sk-ant-secret".to_string()),
        "GITHUB_TOKEN" => Some("ghp_x".to_string()),
        _ => None,
    };
    let passed = drago.clone().with_passed_env(lookup).unwrap();
    assert_eq!(passed.env["ANTHROPIC_API_KEY"], "sk-ant-secret");
    assert_eq!(passed.env["GITHUB_TOKEN"], "ghp_x");
    assert_eq!(passed.env["EDITOR"], "vim");
    // The values are not part of the machine: the hash stays the same.
    assert_eq!(passed.machine(), drago.machine());

    let err = drago
        .with_passed_env(|var| (var == "GITHUB_TOKEN").then(|| "x".to_string()))
        .unwrap_err();
    assert!(err.contains("vms.drago.pass_env"), "{err}");
    assert!(err.contains("ANTHROPIC_API_KEY is not set"), "{err}");

    let luce = fleet.vm("luce").unwrap().clone();
    let err = luce
        .with_passed_env(|_| Some("two\nlines".to_string()))
        .unwrap_err();
    assert!(
        err.contains("ONLY_THIS") && err.contains("control"),
        "{err}"
    );
}

#[test]
fn env_over_64_kib_is_refused() {
    let big = "x".repeat(40 * 1024);
    let text = format!(
        "[images.tiny]\nkernel = \"/k\"\n[vms.a]\nimage = \"tiny\"\nenv = {{ A = \"{big}\", B = \"{big}\" }}\n"
    );
    let (line, field, message) = invalid(&text);
    assert_eq!((line, field.as_str()), (5, "vms.a.env"));
    assert!(message.contains("65536 bytes (64 KiB)"), "{message}");

    let fleet = parse(PASS).unwrap();
    let luce = fleet.vm("luce").unwrap().clone();
    let err = luce
        .with_passed_env(|_| Some("y".repeat(70 * 1024)))
        .unwrap_err();
    assert!(err.contains("limit is 65536 bytes"), "{err}");
}

#[test]
fn bad_env_and_pass_env_names_are_refused() {
    let base = "[images.tiny]\nkernel = \"/k\"\n[vms.a]\nimage = \"tiny\"\n";
    for (extra, field, needle) in [
        (
            "env = { MY-KEY = \"x\" }",
            "vms.a.env",
            "invalid variable name \"MY-KEY\"",
        ),
        (
            "pass_env = [\"9LIVES\"]",
            "vms.a.pass_env",
            "invalid variable name \"9LIVES\"",
        ),
        (
            "pass_env = [\"A-B\"]",
            "vms.a.pass_env",
            "invalid variable name \"A-B\"",
        ),
        (
            "pass_env = [\"A\", \"A\"]",
            "vms.a.pass_env",
            "A is listed twice",
        ),
        (
            "env = { A = \"1\" }\npass_env = [\"A\"]",
            "vms.a.pass_env",
            "A is also set in env",
        ),
    ] {
        let (_, got_field, message) = invalid(&format!("{base}{extra}\n"));
        assert_eq!(got_field, field, "{extra}");
        assert!(message.contains(needle), "{extra}: {message}");
    }
    let (_, field, message) = invalid(
        "[images.tiny]\nkernel = \"/k\"\n[defaults]\npass_env = [\"BAD-NAME\"]\n[vms.a]\nimage = \"tiny\"\n",
    );
    assert_eq!(field, "defaults.pass_env");
    assert!(message.contains("BAD-NAME"), "{message}");
}

#[test]
fn vm_names_may_not_end_in_a_dash() {
    let (_, _, message) = invalid("[images.tiny]\nkernel = \"/k\"\n[vms.web-]\nimage = \"tiny\"\n");
    assert!(message.contains("do not end in '-'"), "{message}");
    assert!(Name::new("web-1").is_ok());
}

#[test]
fn forwards_come_from_defaults_or_the_vm() {
    let fleet = parse(
        "[images.tiny]\nkernel = \"/k\"\n[defaults]\nimage = \"tiny\"\nforwards = [\"8080:80\"]\n\
         [vms.a]\n[vms.b]\nforwards = [\"0.0.0.0:5432:5432\", \"5433:5432\"]\n[vms.c]\nforwards = []\n",
    )
    .unwrap();
    assert_eq!(
        fleet.vm("a").unwrap().forwards,
        [Forward::parse("127.0.0.1:8080:80").unwrap()]
    );
    let b = &fleet.vm("b").unwrap().forwards;
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].host_addr.to_string(), "0.0.0.0");
    assert_eq!((b[1].host_port, b[1].guest_port), (5433, 5432));
    assert!(fleet.vm("c").unwrap().forwards.is_empty());
}

#[test]
fn bad_forwards_name_the_field_and_entry() {
    let base = "[images.tiny]\nkernel = \"/k\"\n[vms.a]\nimage = \"tiny\"\nssh_port = 2300\nspice_port = 5990\n";
    for (extra, needle) in [
        (
            "forwards = [\"8080\"]",
            "\"8080\" is not HOSTPORT:GUESTPORT",
        ),
        ("forwards = [\"0:80\"]", "host port 0 is out of range"),
        (
            "forwards = [\"8080:99999\"]",
            "guest port 99999 is out of range",
        ),
        (
            "forwards = [\"80:80\"]",
            "\"80:80\": host port 80 is below 1024",
        ),
        (
            "forwards = [\"2300:22\"]",
            "\"2300:22\": host port 2300 is this VM's ssh_port",
        ),
        (
            "forwards = [\"5990:1\"]",
            "host port 5990 is this VM's spice_port",
        ),
        (
            "forwards = [\"8080:80\", \"0.0.0.0:8080:81\"]",
            "\"0.0.0.0:8080:81\": host port 8080 is listed twice",
        ),
        (
            "forwards = [\"host:8080:80\"]",
            "\"host\" is not an IP address",
        ),
    ] {
        let (line, field, message) = invalid(&format!("{base}{extra}\n"));
        assert_eq!(field, "vms.a.forwards", "{extra}");
        assert_eq!(line, 7, "{extra}");
        assert!(message.contains(needle), "{extra}: {message}");
    }
    // Two host ports for one guest port are fine.
    let fleet = parse(&format!("{base}forwards = [\"8080:80\", \"8081:80\"]\n")).unwrap();
    assert_eq!(fleet.vm("a").unwrap().forwards.len(), 2);
    let (_, field, message) = invalid(
        "[images.tiny]\nkernel = \"/k\"\n[defaults]\nforwards = [\"1:2\"]\n[vms.a]\nimage = \"tiny\"\n",
    );
    assert_eq!(field, "defaults.forwards");
    assert!(message.contains("\"1:2\""), "{message}");
}

#[test]
fn forwards_are_refused_on_proxmox_vms() {
    let text = r#"
[backends.lab]
kind = "proxmox"
endpoint = "https://pve:8006"
node = "pve"
token = { env = "T" }
[vms.remote]
backend = "lab"
forwards = ["8080:80"]
"#;
    let (_, field, message) = invalid(text);
    assert_eq!(field, "vms.remote.forwards");
    assert!(
        message.contains("open the port in the guest's firewall"),
        "{message}"
    );
}
