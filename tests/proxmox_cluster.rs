//! Proxmox clusters: VMs are found on whichever node they are, every call goes
//! to that node, `node = "auto"` places new VMs, and offline or unknown nodes
//! and templates are named — against the in-repo fake PVE.

mod common;
#[path = "lab/mod.rs"]
mod lab;
#[path = "pve/mod.rs"]
mod pve;

use lab::{Lab, REMOTE};
use pve::{FakeNode, FakeOptions, FakeStorage};

const GIB: u64 = 1 << 30;

/// Two nodes sharing a storage: `pve` (the template's, nearly full) and `pve2`.
fn cluster() -> FakeOptions {
    FakeOptions {
        agent_down_calls: 0,
        nodes: vec![
            FakeNode {
                mem: 20 * GIB,
                ..FakeNode::new("pve")
            },
            FakeNode::new("pve2"),
        ],
        storage: "ceph".into(),
        storages: vec![
            FakeStorage::new(
                "local",
                "dir",
                &["iso", "vztmpl", "backup", "import"],
                false,
            ),
            FakeStorage::new("ceph", "rbd", &["images", "rootdir"], true),
        ],
        ..FakeOptions::default()
    }
}

/// The nodes the requests about VM `vmid` went to.
fn nodes_asked(lab: &Lab, vmid: u32) -> Vec<String> {
    let mut nodes: Vec<String> = lab
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path.contains(&format!("/qemu/{vmid}")))
        .filter_map(|r| r.path.split('/').nth(2).map(String::from))
        .collect();
    nodes.dedup();
    nodes
}

#[test]
fn auto_places_vms_on_the_freest_node_and_they_are_followed_when_migrated() {
    let lab = Lab::with_backend(cluster(), "node = \"auto\"\n", REMOTE);
    lab.create_pool();
    let plan = lab.env.json(&["plan", "remote"]);
    let clone = &plan[0]["changes"][0];
    assert_eq!(clone["key"], "clone", "{plan}");
    assert!(
        clone["new"]
            .as_str()
            .unwrap()
            .contains("on pve (linked clone) to node pve2 (most free memory)"),
        "{plan}"
    );

    lab.env.ok(&["up", "remote", "--no-wait"]);
    let (vmid, vm) = lab.vm("remote");
    assert_eq!(vm.node, "pve2");
    // The template is on pve: the clone asks pve for a clone onto pve2.
    let clone = lab
        .fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/clone"))
        .unwrap();
    assert_eq!(clone.path, "/nodes/pve/qemu/9000/clone");
    assert_eq!(clone.params.get("target").map(String::as_str), Some("pve2"));
    assert_eq!(nodes_asked(&lab, vmid), ["pve2"]);
    let status = lab.env.status("remote");
    assert_eq!(status["node"], "pve2", "{status}");
    assert_eq!(status["state"], "running", "{status}");

    // Migrated by someone else: found where it is now, and reached there.
    lab.fake.migrate(vmid, "pve");
    let status = lab.env.status("remote");
    assert_eq!(status["node"], "pve", "{status}");
    assert_eq!(status["state"], "running", "{status}");
    let out = lab.env.agentvm(&["exec", "remote", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let exec = lab
        .fake
        .requests()
        .into_iter()
        .rfind(|r| r.path.ends_with("/agent/exec"))
        .unwrap();
    assert_eq!(exec.path, format!("/nodes/pve/qemu/{vmid}/agent/exec"));
    let down = lab.env.json(&["down", "remote"]);
    assert_eq!(down[0]["stopped_by"], "agent", "{down}");
    lab.env.ok(&["destroy", "--yes", "remote"]);
    assert!(lab.fake.vms().values().all(|v| v.name != "remote"));
    lab.no_violations();
}

#[test]
fn offline_and_unknown_nodes_and_templates_are_named() {
    let lab = Lab::with_backend(cluster(), "node = \"pve2\"\n", REMOTE);
    lab.create_pool();
    lab.env.ok(&["up", "remote", "--no-wait"]);
    let (vmid, vm) = lab.vm("remote");
    assert_eq!(vm.node, "pve2");

    lab.fake.set_node_online("pve2", false);
    // Its VM is listed as unknown, on its node; verbs on it say why.
    let list = lab.env.json(&["list"]);
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "remote")
        .cloned()
        .unwrap_or_else(|| panic!("remote not listed: {list}"));
    assert_eq!(row["state"], "unknown", "{list}");
    assert_eq!(row["node"], "pve2", "{list}");
    let err = lab.env.fails(&["exec", "remote", "--", "true"]);
    assert!(
        err.contains(&format!("(vmid {vmid}) is on node pve2, which is offline")),
        "{err}"
    );
    // New VMs are not placed on an offline node...
    lab.write_fleet("node = \"pve2\"\n", "[vms.fresh]\nbackend = \"lab\"\n");
    let err = lab.env.fails(&["up", "fresh", "--no-wait"]);
    assert!(
        err.contains("backends.lab.node: node pve2 is offline"),
        "{err}"
    );
    // ...nor on one the cluster does not have.
    lab.write_fleet("node = \"pve9\"\n", "[vms.fresh]\nbackend = \"lab\"\n");
    let err = lab.env.fails(&["up", "fresh", "--no-wait"]);
    assert!(
        err.contains("backends.lab.node: the cluster has no node \"pve9\" (nodes: pve (online), pve2 (offline))"),
        "{err}"
    );
    // auto skips the offline node.
    lab.write_fleet("node = \"auto\"\n", "[vms.fresh]\nbackend = \"lab\"\n");
    lab.env.ok(&["up", "fresh", "--no-wait"]);
    assert_eq!(lab.vm("fresh").1.node, "pve");
    // An unknown template names the templates there are.
    lab.write_fleet(
        "node = \"auto\"\ntemplate = \"debian-13\"\n",
        "[vms.third]\nbackend = \"lab\"\n",
    );
    let err = lab.env.fails(&["up", "third", "--no-wait"]);
    assert!(
        err.contains("backends.lab.template: no template \"debian-13\" in the cluster (templates: 9000 (nixos-template))"),
        "{err}"
    );
    // Proxmox lists a VM of an offline node without its name: if agentvm has
    // not seen it, a VM that may be it is not made a second time.
    std::fs::remove_file(lab.env.home().join("remote/lab/vmids.json")).unwrap();
    lab.write_fleet("node = \"auto\"\n", REMOTE);
    let err = lab.env.fails(&["up", "remote", "--no-wait"]);
    assert!(
        err.contains(&format!("node pve2 is offline with vmid {vmid}"))
            && err.contains("it may be remote"),
        "{err}"
    );
    assert_eq!(
        lab.fake
            .vms()
            .values()
            .filter(|v| v.name == "remote")
            .count(),
        1
    );
    lab.no_violations();
}
