//! `agentvm deploy` and `agentvm retire` of a Proxmox VM take the same steps
//! as a local one, through the daemon, against the in-repo fake PVE (which
//! checks every request against the real API schema).

mod common;
#[path = "lab/mod.rs"]
mod lab;
#[path = "pve/mod.rs"]
mod pve;

use lab::{Lab, REMOTE};
use pve::FakeOptions;

#[test]
fn a_proxmox_vm_is_deployed_recorded_and_retired_like_a_local_one() {
    let lab = Lab::new(
        FakeOptions {
            agent_down_calls: 0,
            ..FakeOptions::default()
        },
        &format!("{REMOTE}ssh_host = \"127.0.0.1\"\n"),
    );
    lab.create_pool();
    let machines = lab.env.dir.path().join("docs/machines.md");

    let first = lab.env.json(&["deploy", "remote", "--timeout", "30"]);
    let first = &first[0];
    let want: Vec<(String, String)> = [
        ("up", "changed"),
        ("host-key", "changed"),
        ("secrets", "skipped"),
        ("sops", "skipped"),
        ("nixos", "skipped"),
        ("tailscale", "skipped"),
        ("inventory", "changed"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(common::statuses(first), want, "{first}");
    let (vmid, _) = lab.vm("remote");
    let key_line = pve::guest::host_key_line(vmid, "remote");
    let key: Vec<&str> = key_line.split_whitespace().take(2).collect();
    let fingerprint = {
        let key = ssh_key::PublicKey::from_openssh(&key.join(" ")).unwrap();
        key.fingerprint(ssh_key::HashAlg::Sha256).to_string()
    };
    let text = std::fs::read_to_string(&machines).unwrap();
    let row = text
        .lines()
        .find(|l| l.starts_with("| remote |"))
        .unwrap_or_else(|| panic!("{text}"));
    for cell in ["lab", "2", "2GiB", "16GiB", &fingerprint, "remote agent"] {
        assert!(row.contains(&format!("| {cell} |")), "{cell:?} in {row}");
    }

    // Again: nothing changes, not a byte of the inventory.
    let before = std::fs::read(&machines).unwrap();
    let second = lab.env.json(&["deploy", "remote"]);
    assert_eq!(second[0]["changed"], false, "{second}");
    assert_eq!(std::fs::read(&machines).unwrap(), before);

    let retired = lab.env.json(&["retire", "remote", "--yes"]);
    assert!(retired["failed"].is_null(), "{retired}");
    assert!(
        lab.fake.vms().iter().all(|(_, vm)| vm.name != "remote"),
        "the VM is gone from the fake PVE"
    );
    assert!(
        !machines.exists(),
        "the inventory agentvm made goes with its last row"
    );
    lab.no_violations();
}
