use super::*;

pub(crate) fn sample_state(name: &str) -> VmState {
    VmState {
        xmlns: AGENTVM_NS.to_string(),
        name: name.to_string(),
        backend: "local".into(),
        home: Some("/home/u/.local/share/agentvm".into()),
        spec_hash: "sha256:00".into(),
        image: "tiny".into(),
        image_digest: "sha256:11".into(),
        ssh_port: 2222,
        spice_port: 5900,
        user: "root".into(),
        readonly: false,
        accel: "tcg".into(),
        network: "slirp".into(),
        agent: true,
        host_key: crate::spec::DEFAULT_HOST_KEY.into(),
        purpose: None,
        forwards: Vec::new(),
        shares: Vec::new(),
        egress: None,
        egress_allow: Vec::new(),
        disk: None,
        layers: Vec::new(),
        boot: None,
        forked_from: None,
    }
}

fn sample_plan() -> DomainPlan {
    DomainPlan {
        memory_kib: 512 * 1024,
        cpus: 1,
        accel: Accel::Tcg,
        network: NetworkMode::Slirp,
        disk: "/home/u/.local/share/agentvm/vms/drago/disk.qcow2".into(),
        kernel: None,
        serial_log: "/home/u/.local/share/agentvm/vms/drago/serial.log".into(),
        guest_agent_socket: "/run/user/1000/agentvm/drago.qga".into(),
        authorized_keys: vec!["ssh-ed25519 AAAA a".into(), "ssh-ed25519 BBBB b".into()],
        env_file: None,
        seed: None,
        state: sample_state("drago"),
        share_sockets: Vec::new(),
        uuid: None,
    }
}

#[test]
fn hostile_values_are_escaped() {
    let mut plan = sample_plan();
    plan.state.purpose = Some("</agentvm:purpose><devices><hostdev/></devices>&".into());
    plan.kernel = Some(KernelBoot {
        kernel: "/k".into(),
        initrd: None,
        cmdline: Some("console=ttyS0 '\"><qemu:arg value='-evil'/>".into()),
        disk_boots: false,
    });
    let xml = plan.to_xml().unwrap();
    assert!(!xml.contains("<hostdev"), "{xml}");
    assert!(!xml.contains("<qemu:arg value='-evil'"), "{xml}");
    assert!(xml.contains("&lt;/agentvm:purpose&gt;"), "{xml}");
    assert!(xml.contains("&amp;"), "{xml}");
}

#[test]
fn slirp_forwards_ssh_on_loopback_with_fixed_pci_address() {
    let xml = sample_plan().to_xml().unwrap();
    assert!(xml.contains("hostfwd=tcp:127.0.0.1:2222-:22"), "{xml}");
    assert!(xml.contains("bus=pcie.0,addr=0x10"), "{xml}");
    assert!(
        xml.contains(&format!("xmlns:qemu=\"{}\"", xml::QEMU_NS)),
        "{xml}"
    );
    assert!(!xml.contains("<interface"), "{xml}");
}

#[test]
fn passt_uses_port_forward() {
    let mut plan = sample_plan();
    plan.network = NetworkMode::Passt;
    let xml = plan.to_xml().unwrap();
    assert!(xml.contains("<backend type=\"passt\"/>"), "{xml}");
    assert!(xml.contains("<range start=\"2222\" to=\"22\"/>"), "{xml}");
    assert!(!xml.contains("qemu:commandline"), "{xml}");
}

#[test]
fn keys_go_into_an_smbios_credential() {
    let xml = sample_plan().to_xml().unwrap();
    assert!(
        xml.contains(
            "io.systemd.credential:ssh.authorized_keys.root=ssh-ed25519 AAAA a\nssh-ed25519 BBBB b"
        ),
        "{xml}"
    );
    assert!(xml.contains("<smbios mode=\"sysinfo\"/>"), "{xml}");
}

#[test]
fn kvm_gets_host_cpu_and_tcg_does_not() {
    let mut plan = sample_plan();
    assert!(plan.to_xml().unwrap().starts_with("<domain type=\"qemu\""));
    plan.accel = Accel::Kvm;
    let xml = plan.to_xml().unwrap();
    assert!(xml.starts_with("<domain type=\"kvm\""), "{xml}");
    assert!(xml.contains("host-passthrough"), "{xml}");
}

#[test]
fn metadata_round_trips_through_domain_xml() {
    let mut plan = sample_plan();
    plan.state.purpose = Some("a <purpose> & more".into());
    plan.state.forwards = ["8080:80", "0.0.0.0:5432:5432", "[::1]:8443:443"]
        .iter()
        .map(|f| metadata::ForwardState::from(&f.parse::<crate::spec::Forward>().unwrap()))
        .collect();
    let xml = plan.to_xml().unwrap();
    let parsed = xml::DefinedDomain::parse(&xml).unwrap();
    assert_eq!(parsed.name, "agentvm-drago");
    assert_eq!(parsed.metadata.unwrap().vm.unwrap(), plan.state);
}

#[test]
fn mac_is_stable_and_local() {
    assert_eq!(mac_address("drago"), mac_address("drago"));
    assert_ne!(mac_address("drago"), mac_address("luce"));
    assert!(mac_address("x").starts_with("52:54:00:"));
}

#[test]
fn guest_agent_socket_is_short_and_bound() {
    let xml = sample_plan().to_xml().unwrap();
    assert!(
        xml.contains("<source mode=\"bind\" path=\"/run/user/1000/agentvm/drago.qga\"/>"),
        "{xml}"
    );
}

#[test]
fn env_goes_through_fw_cfg_from_its_file_only_when_set() {
    let mut plan = sample_plan();
    let xml = plan.to_xml().unwrap();
    assert!(!xml.contains("agentvm.env"), "{xml}");
    assert!(!xml.contains("fwcfg"), "{xml}");
    plan.env_file = Some("/home/user/.local/share/agentvm/vms/drago/agentvm.env".into());
    let xml = plan.to_xml().unwrap();
    let fwcfg = xml
        .split("<sysinfo type=\"fwcfg\">")
        .nth(1)
        .and_then(|rest| rest.split("</sysinfo>").next())
        .unwrap_or_else(|| panic!("no fwcfg sysinfo in {xml}"));
    assert_eq!(
        fwcfg.trim(),
        "<entry name=\"opt/io.systemd.credentials/agentvm.env\" \
         file=\"/home/user/.local/share/agentvm/vms/drago/agentvm.env\"/>"
    );
    // The SSH keys stay an SMBIOS credential; the env is not one any more.
    assert!(
        xml.contains("<entry>io.systemd.credential:ssh.authorized_keys.root="),
        "{xml}"
    );
    assert!(!xml.contains("io.systemd.credential:agentvm.env"), "{xml}");
}

#[test]
fn the_plan_names_the_env_file_and_never_holds_values() {
    let spec = sample_spec();
    let home = crate::paths::Home::at("/home/user/.local/share/agentvm");
    let plan = DomainPlan::new(
        &spec,
        &home,
        Path::new("/run/user/1000/agentvm"),
        None,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGoldenAgentvmKey agentvm",
        Accel::Tcg,
        NetworkMode::Slirp,
        sample_plan().state,
    );
    assert_eq!(plan.env_file, Some(home.vm_env_file("drago")));
    let xml = plan.to_xml().unwrap();
    assert!(!xml.contains("EDITOR"), "{xml}");
    assert!(!xml.contains("vim"), "{xml}");
}

fn sample_spec() -> VmSpec {
    let fleet = crate::spec::Fleet::parse(
        Path::new("/fleet/agentvm.toml"),
        r#"
[images.nixos]
file = "/images/nixos.qcow2"

[images.other]
file = "/images/other.qcow2"

[vms.drago]
image = "nixos"
cpus = 2
memory = "2GiB"
disk = "20GiB"
ssh_port = 2300
spice_port = 5990
env = { EDITOR = "vim" }
ssh_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBc user@host"]
purpose = "builds things"
secrets = ["secrets/drago.age"]
nixos = ".#agent-drago"
"#,
    )
    .unwrap();
    fleet.vm("drago").unwrap().clone()
}

/// A named edit of a spec.
type Edit = (&'static str, fn(&mut VmSpec));

fn hash(spec: &VmSpec) -> String {
    spec_hash(spec, Accel::Tcg, NetworkMode::Slirp)
}

#[test]
fn spec_hash_ignores_what_does_not_change_the_machine() {
    let spec = sample_spec();
    let base = hash(&spec);
    let edits: [Edit; 8] = [
        ("env value", |s| {
            s.env.insert("EDITOR".into(), "nano".into());
        }),
        ("readonly", |s| s.readonly = true),
        ("purpose", |s| s.purpose = Some("something else".into())),
        ("no purpose", |s| s.purpose = None),
        ("secrets", |s| s.secrets.push("secrets/more.age".into())),
        ("nixos", |s| s.nixos = Some(".#agent-other".into())),
        ("backend", |s| s.backend = "pve".into()),
        ("vmid", |s| s.vmid = Some(4242)),
    ];
    for (what, edit) in edits {
        let mut changed = spec.clone();
        edit(&mut changed);
        assert_ne!(changed, spec, "{what} is an edit");
        assert_eq!(hash(&changed), base, "{what} does not change the machine");
    }
}

#[test]
fn spec_hash_follows_what_changes_the_machine() {
    let spec = sample_spec();
    let base = hash(&spec);
    let edits: [Edit; 12] = [
        ("pass_env", |s| s.pass_env.push("GITHUB_TOKEN".into())),
        ("forwards", |s| s.forwards.push("8080:80".parse().unwrap())),
        ("cpus", |s| s.cpus = 3),
        ("memory", |s| {
            s.memory = crate::spec::Size::from_bytes(3 << 30)
        }),
        ("disk", |s| s.disk = None),
        ("image", |s| {
            s.image = Some(crate::spec::Name::new("other").unwrap())
        }),
        ("ssh_port", |s| s.ssh_port = Some(2301)),
        ("spice_port", |s| s.spice_port = None),
        ("env key", |s| {
            s.env.insert("LANG".into(), "C.UTF-8".into());
        }),
        ("ssh_keys", |s| s.ssh_keys.clear()),
        ("user", |s| s.user = "agent".into()),
        ("no image", |s| s.image = None),
    ];
    for (what, edit) in edits {
        let mut changed = spec.clone();
        edit(&mut changed);
        assert_ne!(hash(&changed), base, "{what} changes the machine");
    }
    assert_ne!(
        spec_hash(&spec, Accel::Kvm, NetworkMode::Slirp),
        base,
        "accel"
    );
    assert_ne!(
        spec_hash(&spec, Accel::Tcg, NetworkMode::Passt),
        base,
        "network"
    );
}

#[test]
fn a_vm_without_forwards_keeps_the_hash_it_had_before_forwards() {
    let spec = sample_spec();
    let canonical = serde_json::to_vec(&(spec.machine(), Accel::Tcg, NetworkMode::Slirp)).unwrap();
    assert_eq!(
        hash(&spec),
        format!("sha256:{}", hex::encode(Sha256::digest(&canonical)))
    );
}

#[test]
fn slirp_and_passt_carry_each_forward() {
    let mut plan = sample_plan();
    plan.state.forwards = vec![metadata::ForwardState::from(
        &"0.0.0.0:8080:80".parse::<crate::spec::Forward>().unwrap(),
    )];
    let xml = plan.to_xml().unwrap();
    assert!(
        xml.contains("hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:0.0.0.0:8080-:80"),
        "{xml}"
    );
    plan.network = NetworkMode::Passt;
    let xml = plan.to_xml().unwrap();
    let at = xml
        .find(r#"<portForward proto="tcp" address="0.0.0.0">"#)
        .expect(&xml);
    assert!(
        xml[at..].trim_start_matches(|c| c != '>')[1..]
            .trim_start()
            .starts_with(r#"<range start="8080" to="80"/>"#),
        "{xml}"
    );
}

#[test]
fn the_machine_view_holds_the_spec_fields_it_names() {
    let spec = sample_spec();
    let machine = spec.machine();
    assert_eq!(machine.image.map(|n| n.as_str()), Some("nixos"));
    assert_eq!((machine.cpus, machine.memory), (spec.cpus, spec.memory));
    assert_eq!(machine.disk, spec.disk);
    assert_eq!(
        (machine.ssh_port, machine.spice_port),
        (Some(2300), Some(5990))
    );
    assert_eq!(
        machine.env.iter().copied().collect::<Vec<_>>(),
        spec.env.keys().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(machine.ssh_keys, spec.ssh_keys.as_slice());
    assert_eq!(machine.user, "root");
    let json = serde_json::to_value(machine).unwrap();
    for absent in [
        "name", "readonly", "purpose", "secrets", "nixos", "backend", "vmid", "accel",
    ] {
        assert!(json.get(absent).is_none(), "{absent} in {json}");
    }
}

#[test]
fn a_cloud_init_seed_is_a_second_read_only_raw_disk() {
    let mut plan = sample_plan();
    assert!(!plan.to_xml().unwrap().contains("vdb"));
    plan.seed = Some("/home/user/.local/share/agentvm/vms/drago/cidata.img".into());
    let domain = plan.to_domain();
    let seed = &domain.devices.disk[1];
    assert_eq!(seed.driver.format, "raw");
    assert_eq!(seed.target.dev, "vdb");
    assert!(seed.readonly.is_some());
    assert_eq!(
        seed.source.file,
        "/home/user/.local/share/agentvm/vms/drago/cidata.img"
    );
    assert!(domain.devices.disk[0].readonly.is_none());
}

#[test]
fn direct_boot_is_taken_out_and_the_disk_boots() {
    let xml = "<domain>\n  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n    \
               <kernel>/k</kernel>\n    <initrd>/i</initrd>\n    <cmdline>init=/x &amp; y</cmdline>\n    \
               <smbios mode='sysinfo'/>\n  </os>\n  <devices/>\n</domain>\n";
    let out = super::without_direct_boot(xml).unwrap();
    assert!(
        !out.contains("kernel") && !out.contains("initrd") && !out.contains("cmdline"),
        "{out}"
    );
    assert!(out.contains("<boot dev='hd'/>"), "{out}");
    assert!(
        out.contains("<smbios mode='sysinfo'/>") && out.contains("<devices/>"),
        "{out}"
    );
    // A definition that already boots from its disk stays as it is.
    assert_eq!(super::without_direct_boot(&out).unwrap(), out);
}
