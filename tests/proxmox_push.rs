//! `agentvm image push` to Proxmox against the in-repo fake Proxmox VE: templates made
//! from agentvm images, content-addressed, and the VMs that clone from them.

mod common;
#[path = "lab/mod.rs"]
mod lab;
#[path = "pve/mod.rs"]
mod pve;

use lab::Lab;
use pve::{FakeOptions, FakeVm};
use serde_json::Value;

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

/// A lab with `opts` where a push of `base` fails: the lab and the error.
fn failed_push(opts: FakeOptions) -> (Lab, String) {
    let lab = Lab::new(opts, PUSHABLE);
    lab.create_pool();
    base_image(&lab, 64);
    let err = lab
        .env
        .fails(&["image", "push", "base", "--backend", "lab"]);
    (lab, err)
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
    lab.create_pool();
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
    lab.create_pool();
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
    let (lab, err) = failed_push(FakeOptions {
        storages: vec![
            pve::FakeStorage::new("local", "dir", &["iso", "vztmpl", "backup"], false),
            pve::FakeStorage::new("local-lvm", "lvmthin", &["images", "rootdir"], false),
        ],
        ..FakeOptions::default()
    });
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
    let (lab, err) = failed_push(FakeOptions {
        fail_task: Some((
            "qmtemplate".into(),
            "can't make a template: disk busy".into(),
        )),
        ..FakeOptions::default()
    });
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
    lab.create_pool();
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
    lab.create_pool();
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
    lab.create_pool();
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
