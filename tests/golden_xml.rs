//! The domain XML agentvm writes, pinned in `xml/`. A change to the generated XML
//! fails here until the golden files are regenerated on purpose with
//! `AGENTVM_BLESS=1 cargo test --test golden_xml`. Every golden file is also
//! checked against libvirt's schema with `virt-xml-validate`.

use std::path::{Path, PathBuf};
use std::process::Command;

use agentvm::domain::{Accel, DomainPlan, KernelBoot, NetworkMode, VmState, spec_hash};
use agentvm::paths::Home;
use agentvm::spec::Fleet;

const FLEET: &str = r#"
[defaults]
cpus = 2
memory = "2GiB"
ssh_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGoldenUserKey user@laptop"]

[images.nixos]
file = "/images/nixos.qcow2"

[images.tiny]
kernel = "/images/vmlinuz"
initrd = "/images/initrd.img"
cmdline = "console=ttyS0 quiet"

[vms.drago]
image = "nixos"
memory = "4GiB"
disk = "40GiB"
purpose = "drives <things> & \"stuff\""
env = { EDITOR = "vim", GREETING = "hello, world" }

[vms.luce]
image = "tiny"
cpus = 1
memory = "512MiB"
readonly = true

[vms.pinned]
image = "nixos"
ssh_port = 2400
spice_port = 5990

[vms.web]
image = "nixos"
forwards = ["8080:80", "0.0.0.0:5432:5432", "[::1]:8443:443"]

[vms.shared]
image = "nixos"
shares = [
  { host = "/home/user/src/site", guest = "/work" },
  { host = "/home/user/docs", guest = "/docs", readonly = true },
  { host = "/home/user/old", guest = "/old", type = "9p", readonly = true },
]
[vms.sealed]
image = "nixos"
egress = "none"

[vms.proxied]
image = "nixos"
egress = ["github.com:443", "*.crates.io:443", "10.0.2.2:8000"]
"#;

const AGENTVM_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGoldenAgentvmKey agentvm";

struct Case {
    file: &'static str,
    vm: &'static str,
    ports: (u16, u16),
    network: NetworkMode,
    kernel: bool,
}

const CASES: &[Case] = &[
    Case {
        file: "disk-image.xml",
        vm: "drago",
        ports: (2222, 5900),
        network: NetworkMode::Slirp,
        kernel: false,
    },
    Case {
        file: "direct-kernel.xml",
        vm: "luce",
        ports: (2223, 5901),
        network: NetworkMode::Slirp,
        kernel: true,
    },
    Case {
        file: "pinned-ports.xml",
        vm: "pinned",
        ports: (2400, 5990),
        network: NetworkMode::Slirp,
        kernel: false,
    },
    Case {
        file: "passt.xml",
        vm: "drago",
        ports: (2222, 5900),
        network: NetworkMode::Passt,
        kernel: false,
    },
    Case {
        file: "forwards.xml",
        vm: "web",
        ports: (2224, 5902),
        network: NetworkMode::Slirp,
        kernel: false,
    },
    Case {
        file: "shares.xml",
        vm: "shared",
        ports: (2227, 5905),
        network: NetworkMode::Slirp,
        kernel: false,
    },
    Case {
        file: "egress-none.xml",
        vm: "sealed",
        ports: (2225, 5903),
        network: NetworkMode::Slirp,
        kernel: false,
    },
    Case {
        file: "egress-allow.xml",
        vm: "proxied",
        ports: (2226, 5904),
        network: NetworkMode::Slirp,
        kernel: false,
    },
    Case {
        file: "forwards-passt.xml",
        vm: "web",
        ports: (2224, 5902),
        network: NetworkMode::Passt,
        kernel: false,
    },
];

fn generate(case: &Case) -> String {
    let fleet = Fleet::parse(Path::new("/fleet/agentvm.toml"), FLEET).unwrap();
    let spec = fleet.vm(case.vm).unwrap();
    if let Some(pinned) = spec.ssh_port {
        assert_eq!(pinned, case.ports.0, "pinned ports come from the spec");
    }
    let home = Home::at("/home/user/.local/share/agentvm");
    let kernel = case.kernel.then(|| KernelBoot {
        kernel: "/home/user/.local/share/agentvm/images/1111.kernel".into(),
        initrd: Some("/home/user/.local/share/agentvm/images/2222.initrd".into()),
        cmdline: Some("console=ttyS0 quiet".into()),
        disk_boots: false,
    });
    let hash = spec_hash(spec, Accel::Tcg, case.network);
    let mut state = VmState::new(
        spec,
        "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        hash,
        case.ports,
        Accel::Tcg,
        case.network,
    );
    state.home = Some(home.root().display().to_string());
    DomainPlan::new(
        spec,
        &home,
        Path::new("/run/user/1000/agentvm"),
        kernel,
        AGENTVM_KEY,
        Accel::Tcg,
        case.network,
        state,
    )
    .to_xml()
    .unwrap()
}

fn golden_path(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("xml").join(file)
}

#[test]
fn generated_xml_matches_the_golden_files() {
    let bless = std::env::var_os("AGENTVM_BLESS").is_some();
    let mut drifted = Vec::new();
    for case in CASES {
        let xml = generate(case);
        let path = golden_path(case.file);
        if bless {
            std::fs::write(&path, &xml).unwrap();
            continue;
        }
        let golden = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with AGENTVM_BLESS=1 to create it)",
                path.display()
            )
        });
        if golden != xml {
            drifted.push(format!(
                "{}:\n--- golden\n{golden}\n+++ generated\n{xml}",
                case.file
            ));
        }
    }
    assert!(
        drifted.is_empty(),
        "domain XML drifted from xml/ (regenerate with AGENTVM_BLESS=1 if intended):\n{}",
        drifted.join("\n")
    );
}

#[test]
fn golden_files_pass_libvirts_schema() {
    for case in CASES {
        let path = golden_path(case.file);
        let out = Command::new("virt-xml-validate")
            .arg(&path)
            .arg("domain")
            .output()
            .expect("virt-xml-validate (Debian package libvirt-clients, with libxml2-utils) must be installed");
        assert!(
            out.status.success(),
            "{} fails libvirt's domain schema:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn golden_files_cover_what_the_issue_names() {
    let disk = std::fs::read_to_string(golden_path("disk-image.xml")).unwrap();
    assert!(disk.contains("<boot dev=\"hd\"/>") && !disk.contains("<kernel>"));
    assert!(disk.contains("&lt;things&gt; &amp;"), "purpose is escaped");
    let kernel = std::fs::read_to_string(golden_path("direct-kernel.xml")).unwrap();
    assert!(
        kernel.contains("<kernel>") && kernel.contains("<cmdline>console=ttyS0 quiet</cmdline>")
    );
    let pinned = std::fs::read_to_string(golden_path("pinned-ports.xml")).unwrap();
    assert!(pinned.contains("hostfwd=tcp:127.0.0.1:2400-:22"));
    assert!(pinned.contains("port=\"5990\" autoport=\"no\" listen=\"127.0.0.1\""));
    let forwards = std::fs::read_to_string(golden_path("forwards.xml")).unwrap();
    assert!(forwards.contains(
        "hostfwd=tcp:127.0.0.1:2224-:22,hostfwd=tcp:127.0.0.1:8080-:80,\
         hostfwd=tcp:0.0.0.0:5432-:5432,hostfwd=tcp:[::1]:8443-:443"
    ));
    assert!(forwards.contains(
        "<agentvm:forward host-addr=\"127.0.0.1\" host-port=\"8080\" guest-port=\"80\"/>"
    ));
    let shares = std::fs::read_to_string(golden_path("shares.xml")).unwrap();
    assert!(
        shares.contains(
            "<memoryBacking>\n    <source type=\"memfd\"/>\n    <access mode=\"shared\"/>"
        )
    );
    assert!(shares.contains(
        "<source socket=\"/run/user/1000/agentvm/shared.agentvm1.sock\"/>\n      <target dir=\"agentvm1\"/>"
    ));
    assert!(shares.contains(
        "<filesystem type=\"mount\" accessmode=\"passthrough\">\n      <source dir=\"/home/user/old\"/>\n      <target dir=\"agentvm2\"/>\n      <readonly/>"
    ));
    assert!(
        shares.contains(
            "io.systemd.credential:fstab.extra=agentvm0 /work virtiofs defaults,nofail 0 0"
        )
    );
    let sealed = std::fs::read_to_string(golden_path("egress-none.xml")).unwrap();
    assert!(sealed.contains("user,id=agentvm-net0,hostfwd=tcp:127.0.0.1:2225-:22,restrict=on"));
    assert!(sealed.contains("<agentvm:egress>none</agentvm:egress>"));
    assert!(!sealed.contains("fwcfg"), "egress none needs no env");
    let proxied = std::fs::read_to_string(golden_path("egress-allow.xml")).unwrap();
    assert!(proxied.contains("hostfwd=tcp:127.0.0.1:2226-:22,restrict=on"));
    assert!(proxied.contains(
        "<agentvm:egress>allow</agentvm:egress>\n      \
         <agentvm:egress-allow>github.com:443</agentvm:egress-allow>"
    ));
    assert!(proxied.contains("<agentvm:egress-allow>*.crates.io:443</agentvm:egress-allow>"));
    assert!(
        proxied.contains("name=\"opt/io.systemd.credentials/agentvm.env\""),
        "the proxy variables reach the guest as env"
    );
    for open in ["disk-image.xml", "forwards.xml", "pinned-ports.xml"] {
        let xml = std::fs::read_to_string(golden_path(open)).unwrap();
        assert!(
            !xml.contains("restrict=on") && !xml.contains("agentvm:egress"),
            "{open}"
        );
    }
    let passt = std::fs::read_to_string(golden_path("forwards-passt.xml")).unwrap();
    assert!(passt.contains(
        "<portForward proto=\"tcp\" address=\"0.0.0.0\">\n        <range start=\"5432\" to=\"5432\"/>"
    ));
}
