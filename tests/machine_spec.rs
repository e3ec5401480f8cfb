//! What changes a VM: only edits to what ends up in the machine (cpus, memory,
//! disk, image, ports, env, keys, user) make a running VM need a restart or a
//! stopped one a redefinition. Purpose, readonly, secrets and nixos do not.

mod common;

use common::Env;

#[test]
fn only_machine_edits_need_a_restart_or_a_redefinition() {
    let env = Env::new();
    let vm = |extra: &str| format!("[vms.m-drift]\n{extra}\n");
    env.write_fleet(&vm(""));
    env.owns(&["m-drift"]);
    env.ok(&["up", "m-drift", "--no-wait"]);

    // Running: edits that stay outside the machine need no restart, and status
    // shows the spec's purpose and readonly.
    env.write_fleet(&vm(
        "purpose = \"reviews code\"\nreadonly = true\nsecrets = [\"secrets/m.age\"]\nnixos = \".#agent-m-drift\"",
    ));
    let up = env.json(&["up", "m-drift", "--no-wait"]);
    assert_eq!(up[0]["action"], "already-running", "{up}");
    assert_eq!(up[0]["restart_needed"], false, "{up}");
    let status = env.status("m-drift");
    assert_eq!(status["restart_needed"], false, "{status}");
    assert_eq!(status["purpose"], "reviews code", "{status}");
    assert_eq!(status["readonly"], true, "{status}");

    // Machine edits do.
    for edit in ["memory = \"320MiB\"", "env = { EDITOR = \"vim\" }"] {
        env.write_fleet(&vm(edit));
        let up = env.json(&["up", "m-drift", "--no-wait"]);
        assert_eq!(up[0]["restart_needed"], true, "{edit}: {up}");
        assert_eq!(env.status("m-drift")["restart_needed"], true, "{edit}");
    }

    // Stopped: a VM made readonly, with a new purpose, starts as it is; it
    // is neither redefined nor refused as a readonly redefinition.
    env.write_fleet(&vm(""));
    env.ok(&["down", "--force", "m-drift"]);
    env.write_fleet(&vm("readonly = true\npurpose = \"reviews code\""));
    let up = env.json(&["up", "m-drift", "--no-wait"]);
    assert_eq!(up[0]["action"], "started", "{up}");
    assert_eq!(up[0]["restart_needed"], false, "{up}");
    env.write_fleet(&vm(""));
}
