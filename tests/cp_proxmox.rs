//! `agentvm cp --via agent` from a Proxmox VM against the in-repo fake PVE,
//! which checks every request against the real API schema: the file comes in
//! chunks through `agent/file-read` with `offset` and `count`.

mod common;
#[path = "lab/mod.rs"]
mod lab;
#[path = "pve/mod.rs"]
mod pve;

use std::os::unix::fs::PermissionsExt;

use lab::{Lab, REMOTE};
use pve::FakeOptions;

const CHUNK: usize = 512 * 1024;

#[test]
fn cp_through_the_agent_reads_a_proxmox_guest_file_in_chunks() {
    let lab = Lab::new(
        FakeOptions {
            agent_down_calls: 0,
            ..FakeOptions::default()
        },
        REMOTE,
    );
    lab.create_pool();
    lab.env.ok(&["up", "remote", "--no-wait"]);
    let (vmid, _) = lab.vm("remote");

    // The fake runs `agent/exec` on this host (where cp's probe stats the
    // path) and keeps the guest's files in memory (what `agent/file-read`
    // answers): the same path in both with other bytes shows the copy came
    // through file-read.
    let dir = lab.env.dir.path().join("guest");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("data.bin");
    let path_text = path.to_str().unwrap();
    let size = 2 * CHUNK + 151_424;
    std::fs::write(&path, vec![0u8; size]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    lab.fake.put_guest_file(vmid, path_text, &data);

    let copy = lab.env.dir.path().join("copy.bin");
    let out = lab.env.json(&[
        "cp",
        "--via",
        "agent",
        &format!("remote:{path_text}"),
        copy.to_str().unwrap(),
    ]);
    assert_eq!(out["via"], "agent", "{out}");
    assert_eq!(out["direction"], "from-guest", "{out}");
    assert_eq!(out["bytes"], size, "{out}");
    assert!(std::fs::read(&copy).unwrap() == data, "the copy differs");
    let mode = std::fs::metadata(&copy).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640);

    let reads: Vec<(Option<String>, Option<String>)> = lab
        .fake
        .requests()
        .into_iter()
        .filter(|r| {
            r.path.ends_with("/agent/file-read")
                && r.params.get("file").map(String::as_str) == Some(path_text)
        })
        .map(|r| {
            (
                r.params.get("offset").cloned(),
                r.params.get("count").cloned(),
            )
        })
        .collect();
    let count = Some(CHUNK.to_string());
    assert_eq!(
        reads,
        [
            (None, count.clone()),
            (Some(CHUNK.to_string()), count.clone()),
            (Some((2 * CHUNK).to_string()), count),
        ]
    );
    lab.no_violations();
}

#[test]
fn cp_through_the_agent_writes_and_reads_a_proxmox_guest_file_past_one_file_write() {
    // Here the fake's file calls use this host's files, as its agent/exec
    // does: cp's scripts (probe, cat of part files, mv) and its file calls
    // see one file system.
    let lab = Lab::new(
        FakeOptions {
            agent_down_calls: 0,
            files_on_host: true,
            ..FakeOptions::default()
        },
        REMOTE,
    );
    lab.create_pool();
    lab.env.ok(&["up", "remote", "--no-wait"]);

    let guest_dir = lab.env.dir.path().join("guest");
    std::fs::create_dir_all(&guest_dir).unwrap();
    let src = lab.env.dir.path().join("src.bin");
    let size = CHUNK + 100_000;
    let data: Vec<u8> = (0..size).map(|i| (i * 13 % 253) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();

    let out = lab.env.json(&[
        "cp",
        "--via",
        "agent",
        src.to_str().unwrap(),
        &format!("remote:{}", guest_dir.display()),
    ]);
    assert_eq!(out["via"], "agent", "{out}");
    assert_eq!(out["bytes"], size, "{out}");
    let written = guest_dir.join("src.bin");
    assert!(
        std::fs::read(&written).unwrap() == data,
        "the guest's copy differs"
    );
    let mode = std::fs::metadata(&written).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o750);
    // Nothing but the copy is left: no temporary name, no part file.
    let names: Vec<String> = std::fs::read_dir(&guest_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["src.bin"]);
    // Each agent/file-write took at most 46080 bytes (the schema's maxLength
    // is checked on every request): many of them for 0.6 MiB.
    let writes = lab
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/agent/file-write"))
        .count();
    assert!(writes > size / 46080, "{writes} file-write calls");

    let back = lab.env.dir.path().join("back.bin");
    lab.env.ok(&[
        "cp",
        "--via",
        "agent",
        &format!("remote:{}", written.display()),
        back.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the copy back differs"
    );
    let mode = std::fs::metadata(&back).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o750);
    lab.no_violations();
}
