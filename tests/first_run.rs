//! A new user's first commands: `init`, `completions`, `man`, and `up`, `down`,
//! `status` and `destroy --all` without names (real libvirt, the test guest).

mod common;

use common::Env;

#[test]
fn init_writes_a_fleet_file_that_parses_and_never_overwrites_it() {
    let env = Env::new();
    let path = env.fleet_path();
    let out = env.ok(&["init"]);
    assert!(out.contains(&format!("wrote {}", path.display())), "{out}");
    assert!(out.contains("next: "), "{out}");
    let written = std::fs::read(&path).unwrap();
    let text = String::from_utf8(written.clone()).unwrap();
    assert!(text.starts_with("# agentvm.toml"), "{text}");
    let fleet = agentvm::spec::Fleet::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(fleet.vms.contains_key("agent"), "{text}");
    assert!(
        text.contains("accel = \"kvm\"") || text.contains("accel = \"tcg\""),
        "{text}"
    );

    let err = env.fails(&["init"]);
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        written,
        "the file was changed"
    );
}

#[test]
fn init_without_an_image_says_how_to_get_one_and_up_names_the_missing_file() {
    let mut env = Env::new();
    let empty = env.dir.path().join("no-guest");
    std::fs::create_dir(&empty).unwrap();
    env.set_env("AGENTVM_TESTGUEST_DIR", empty.to_str().unwrap());
    let out = env.ok(&["init"]);
    assert!(out.contains("not on this machine"), "{out}");
    assert!(out.contains("curl -Lo"), "{out}");
    let text = std::fs::read_to_string(env.fleet_path()).unwrap();
    agentvm::spec::Fleet::load(&env.fleet_path()).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let image = std::path::Path::new(&std::env::var("HOME").unwrap())
        .join("images/debian-12-genericcloud-amd64.qcow2");
    if image.exists() {
        eprintln!("{} exists: not checking that up fails", image.display());
        return;
    }
    let err = env.fails(&["up", "--no-wait"]);
    assert!(err.contains(&image.display().to_string()), "{err}");
}

#[test]
fn completions_and_man_pages() {
    let env = Env::new();
    let bash = env.ok(&["completions", "bash"]);
    for word in ["agentvm", "up", "destroy", "completions"] {
        assert!(bash.contains(word), "{word} missing from:\n{bash}");
    }
    for shell in ["zsh", "fish"] {
        assert!(!env.ok(&["completions", shell]).is_empty());
    }
    let man = env.ok(&["man"]);
    assert!(
        man.starts_with(".ie \\n(.g .ds Aq") || man.starts_with(".TH"),
        "{man}"
    );
    assert!(man.contains(".TH agentvm 1"), "{man}");

    let dir = env.dir.path().join("man");
    env.ok(&["man", "--out", dir.to_str().unwrap()]);
    for page in ["agentvm.1", "agentvm-up.1", "agentvm-init.1"] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}: {text}");
    }
}

/// `agentvm … | head -1`: output into a pipe whose reader has gone ends the
/// command quietly with 141, as SIGPIPE ends a C tool, not with a panic.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let env = Env::new();
    env.write_fleet("[vms.pipe-a]\n");
    for args in [&["completions", "bash"][..], &["man"], &["list", "--json"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = env
            .command(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "agentvm {args:?}: {stderr}");
        assert!(stderr.is_empty(), "agentvm {args:?} said: {stderr}");
    }
}

fn states(env: &Env) -> Vec<(String, String)> {
    let rows = env.json(&["status"]);
    let mut states: Vec<(String, String)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    states.sort();
    states
}

#[test]
fn up_down_status_and_destroy_all_without_names() {
    let env = Env::new();
    const A: &str = "e2e-noname-a";
    const B: &str = "e2e-noname-b";
    env.write_fleet(&format!("[vms.{A}]\n[vms.{B}]\n"));
    env.owns(&[A, B]);
    let pair = |state: &str| {
        vec![
            (A.to_string(), state.to_string()),
            (B.to_string(), state.to_string()),
        ]
    };

    let up = env.ok(&["up", "--no-wait"]);
    assert!(
        up.contains(&format!("{A}: ")) && up.contains(&format!("{B}: ")),
        "{up}"
    );
    assert_eq!(states(&env), pair("running"));
    let table = env.ok(&["status"]);
    assert!(table.contains(A) && table.contains(B), "{table}");

    let down = env.ok(&["down", "--force"]);
    assert!(
        down.contains(&format!("{A}: ")) && down.contains(&format!("{B}: ")),
        "{down}"
    );
    assert_eq!(states(&env), pair("stopped"));

    let err = env.fails(&["destroy"]);
    assert!(err.contains("--all"), "{err}");
    // Without a terminal, --all needs --yes too.
    let err = env.fails(&["destroy", "--all"]);
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(states(&env), pair("stopped"));

    let destroyed = env.ok(&["destroy", "--all", "--yes"]);
    assert!(
        destroyed.contains(&format!("{A}: destroyed"))
            && destroyed.contains(&format!("{B}: destroyed")),
        "{destroyed}"
    );
    assert_eq!(states(&env), pair("absent"));
    assert!(!common::domain_exists(A) && !common::domain_exists(B));
}
