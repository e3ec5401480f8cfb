use super::*;

const FLEET: &str = "# my agents\n[defaults]\nimage = \"nixos\" # the base\n\n[images.nixos]\nflake = \".#agent-base-image\"\n\n# drago builds things\n[vms.drago]\nnixos = \".#agent-drago\"\n";

#[test]
fn adds_a_vm_keeping_comments_and_order() {
    let edited = add_vm(FLEET, "luce", None, true, 2301, 5901).unwrap();
    assert!(
        edited.starts_with(FLEET),
        "existing text kept as it was:\n{edited}"
    );
    assert!(
        edited.ends_with(
            "\n[vms.luce]\nnixos = \".#agent-luce\"\nssh_port = 2301\nspice_port = 5901\n"
        ),
        "{edited}"
    );
    let fleet = Fleet::parse(Path::new("/x/agentvm.toml"), &edited).unwrap();
    assert_eq!(fleet.vm("luce").unwrap().ssh_port, Some(2301));
}

#[test]
fn an_existing_name_is_refused() {
    let err = add_vm(FLEET, "drago", None, true, 2301, 5901)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn a_file_without_vms_gets_a_vms_table() {
    let edited = add_vm("[defaults]\ncpus = 2\n", "a", None, true, 2222, 5900).unwrap();
    assert_eq!(
        edited,
        "[defaults]\ncpus = 2\n\n[vms.a]\nnixos = \".#agent-a\"\nssh_port = 2222\nspice_port = 5900\n"
    );
}

#[test]
fn the_image_is_the_given_one_the_default_or_the_only_one() {
    let fleet = |text: &str| Fleet::parse(Path::new("/x/agentvm.toml"), text).unwrap();
    let name = Name::new("luce").unwrap();
    let one = "[images.base]\nfile = \"/b.qcow2\"\n";
    let two = "[images.a]\nfile = \"/a.qcow2\"\n[images.b]\nfile = \"/b.qcow2\"\n";
    // The only image is used; --image must name a defined one.
    assert_eq!(
        vm_image(&fleet(one), one, &name, None).unwrap().as_deref(),
        Some("base")
    );
    let err = vm_image(&fleet(one), one, &name, Some("nope"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no image named \"nope\"") && err.contains("base"),
        "{err}"
    );
    // [defaults] image: nothing to add.
    let with_default = format!("[defaults]\nimage = \"a\"\n{two}");
    assert_eq!(
        vm_image(&fleet(&with_default), &with_default, &name, None).unwrap(),
        None
    );
    // Several and no default: say the flag and the key.
    let err = vm_image(&fleet(two), two, &name, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--image IMAGE (one of: a, b)") && err.contains("[defaults]"),
        "{err}"
    );
    assert_eq!(
        vm_image(&fleet(two), two, &name, Some("b"))
            .unwrap()
            .as_deref(),
        Some("b")
    );
    // None at all.
    let err = vm_image(&fleet(""), "", &name, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no image is defined") && err.contains("[images.NAME]"),
        "{err}"
    );
}
