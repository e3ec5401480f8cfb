//! Egress policies on the real Debian guest: `none` refuses the guest's own
//! connections out while SSH and exec keep working; an allow list admits the
//! listed host:port through the daemon's proxy (CONNECT and plain HTTP, found
//! through the guest's `https_proxy`/`http_proxy`), refuses the rest with 403
//! and remembers it, and a direct connection to a listed port still fails.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Env, debian_image};
use serde_json::{Value, json};

const BOOT_TIMEOUT: &str = "600";
const VM: &str = "egress-deb";

/// A host listener on 127.0.0.1 that answers every connection with
/// `hello-<tag>` and keeps what each connection sent first.
struct Listener {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Listener {
    fn start(tag: &'static str) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kept = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                stream
                    .set_read_timeout(Some(Duration::from_secs(1)))
                    .unwrap();
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).unwrap_or(0);
                kept.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let _ = stream.write_all(format!("hello-{tag}\n").as_bytes());
            }
        });
        Self { port, seen }
    }

    fn connections(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// Runs `script` with bash in the guest (through the agent, with the VM's
/// env); returns its standard output.
fn guest(env: &Env, script: &str) -> String {
    env.ok(&["exec", VM, "--", "/bin/bash", "-c", script])
}

/// A direct connection from the guest to the host's `port` (10.0.2.2).
fn direct(port: u16) -> String {
    format!(
        "if timeout 10 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}; cat <&3'; \
         then echo direct=connected; else echo direct=failed; fi"
    )
}

/// `request` sent to the proxy named by the guest's `$var`.
fn through_proxy(var: &str, request: &str) -> String {
    format!(
        "p=${{{var}#http://}}; [ -n \"$p\" ] || {{ echo no-{var}; exit 0; }}; \
         exec 3<>/dev/tcp/${{p%%:*}}/${{p##*:}} || {{ echo no-proxy; exit 0; }}; \
         printf '{request}' >&3; timeout 15 cat <&3; true"
    )
}

fn egress(env: &Env) -> Value {
    env.json(&["egress", VM])
}

/// Waits until the daemon's tunnel into the guest is up.
fn wait_tunnel(env: &Env) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let report = egress(env);
        if report["tunnel"]["up"] == json!(true) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "the egress tunnel did not come up: {report}\n{}",
            env.daemon_log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn fleet(env: &Env, egress: &str) {
    env.write_raw_fleet(&format!(
        "[defaults]\ncpus = 2\nmemory = \"1GiB\"\n\n[images.debian]\nfile = {:?}\n\n\
         [vms.{VM}]\nimage = \"debian\"\negress = {egress}\n",
        debian_image("plain").display().to_string()
    ));
}

#[test]
fn egress_none_and_an_allow_list_on_debian() {
    let env = Env::new();
    let (listed, unlisted) = (Listener::start("listed"), Listener::start("unlisted"));
    let (a, b) = (listed.port, unlisted.port);

    // none: nothing out, SSH and exec still work.
    fleet(&env, "\"none\"");
    env.owns(&[VM]);
    env.ok(&["up", VM, "--timeout", BOOT_TIMEOUT]);
    assert_eq!(env.status(VM)["egress"], json!("none"));
    assert_eq!(env.ssh(VM, "echo ssh-works").trim(), "ssh-works");
    let said = guest(&env, &direct(a));
    assert!(said.contains("direct=failed"), "{said}");
    assert!(
        listed.connections().is_empty(),
        "{:?}",
        listed.connections()
    );
    let report = egress(&env);
    assert_eq!(report["policy"], json!("none"));
    assert_eq!(report["tunnel"], Value::Null);

    // Changing egress needs a restart, not a new image.
    fleet(&env, &format!("[\"10.0.2.2:{a}\"]"));
    let up = env.agentvm(&["up", VM, "--timeout", BOOT_TIMEOUT]);
    let said = String::from_utf8_lossy(&up.stderr);
    assert!(up.status.success(), "{said}");
    assert!(said.contains("restart needed"), "{said}");
    assert_eq!(env.status(VM)["restart_needed"], json!(true));
    env.ok(&["down", VM, "--timeout", "60"]);
    // --no-wait returns before SSH: the daemon brings the tunnel up anyway.
    env.ok(&["up", VM, "--no-wait"]);
    wait_tunnel(&env);
    env.ok(&["up", VM, "--timeout", BOOT_TIMEOUT]);
    let allow = json!({"allow": [format!("10.0.2.2:{a}")]});
    assert_eq!(env.status(VM)["egress"], allow);
    let listed_vms = env.json(&["list"]);
    let row = listed_vms
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == json!(VM))
        .unwrap();
    assert_eq!(row["egress"], allow);
    let report = wait_tunnel(&env);
    assert_eq!(report["policy"], allow);
    assert!(
        env.status(VM)["egress_tunnel"]
            .as_str()
            .is_some_and(|t| t.starts_with("up since")),
        "{}",
        env.status(VM)
    );

    // The listed target through the proxy, with CONNECT (https_proxy)...
    let connect = |port: u16| {
        format!("CONNECT 10.0.2.2:{port} HTTP/1.1\\r\\nHost: 10.0.2.2:{port}\\r\\n\\r\\n")
    };
    let said = guest(&env, &through_proxy("https_proxy", &connect(a)));
    assert!(
        said.starts_with("HTTP/1.1 200 Connection established\r\n\r\nhello-listed"),
        "{said}"
    );
    // ...and as plain HTTP (http_proxy).
    let get = format!("GET http://10.0.2.2:{a}/path HTTP/1.1\\r\\nHost: 10.0.2.2:{a}\\r\\n\\r\\n");
    let said = guest(&env, &through_proxy("http_proxy", &get));
    assert_eq!(said, "hello-listed\n");
    let seen = listed.connections();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen[1].starts_with("GET /path HTTP/1.1\r\nHost: 10.0.2.2:"),
        "{seen:?}"
    );

    // The unlisted one is refused by the proxy and never reached.
    let said = guest(&env, &through_proxy("https_proxy", &connect(b)));
    assert!(said.starts_with("HTTP/1.1 403 Forbidden"), "{said}");
    assert!(unlisted.connections().is_empty());

    // Without the proxy, even the listed port is out of reach.
    let said = guest(&env, &direct(a));
    assert!(said.contains("direct=failed"), "{said}");
    assert_eq!(listed.connections().len(), 2);

    let report = egress(&env);
    let connections = report["connections"].as_array().unwrap();
    let refused: Vec<&Value> = connections
        .iter()
        .filter(|c| c["admitted"] == json!(false))
        .collect();
    assert_eq!(refused.len(), 1, "{report}");
    assert_eq!(refused[0]["host"], json!("10.0.2.2"));
    assert_eq!(refused[0]["port"], json!(b));
    assert!(refused[0]["at"].as_u64().is_some_and(|t| t > 0), "{report}");
    let admitted = connections
        .iter()
        .filter(|c| c["admitted"] == json!(true) && c["port"] == json!(a))
        .count();
    assert_eq!(admitted, 2, "{report}");
    let log = env.daemon_log();
    assert!(
        log.lines()
            .any(|l| l.contains("egress refused") && l.contains(VM) && l.contains(&b.to_string())),
        "{log}"
    );
    let text = env.ok(&["egress", VM]);
    assert!(text.contains(&format!("REFUSED   10.0.2.2:{b}")), "{text}");

    // A tunnel that dies is started again while the VM runs.
    let first = tunnel_ssh().expect("an ssh process holds the tunnel");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    wait_tunnel(&env);
    let second = tunnel_ssh().expect("a new ssh holds the tunnel");
    assert_ne!(first, second);
    let said = guest(&env, &through_proxy("https_proxy", &connect(a)));
    assert!(said.contains("hello-listed"), "{said}");

    // A new daemon takes up the proxies of running VMs.
    env.ok(&["daemon", "--stop"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tunnel_ssh().is_some() {
        assert!(
            Instant::now() < deadline,
            "the old daemon's ssh outlived it"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_tunnel(&env);
    let said = guest(&env, &through_proxy("https_proxy", &connect(a)));
    assert!(said.contains("hello-listed"), "{said}");
    assert_eq!(listed.connections().len(), 4);

    // Down stops the proxy and its tunnel.
    env.ok(&["down", VM, "--timeout", "60"]);
    let report = egress(&env);
    assert_eq!(report["tunnel"], Value::Null);
    assert!(tunnel_ssh().is_none());
    // The connections stay after down (this daemon's: the one since it started).
    assert_eq!(
        report["connections"].as_array().unwrap().len(),
        1,
        "{report}"
    );
}

/// The pid of the ssh holding this VM's tunnel, if one runs.
fn tunnel_ssh() -> Option<u32> {
    let socket = format!("egress-{VM}.sock");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(entry.path().join("cmdline")).ok()?;
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            (line.starts_with("ssh ") && line.contains(&socket)).then_some(pid)
        })
}

#[path = "lab/mod.rs"]
mod lab;
#[path = "pve/mod.rs"]
mod pve;

/// Proxmox VMs are always `open`; a spec with another policy brought to a
/// Proxmox backend with `up --backend` is the typed unsupported error, and
/// nothing is made there.
#[test]
fn proxmox_refuses_egress_other_than_open() {
    let sealed = "[images.deb]\nfile = \"/images/deb.qcow2\"\n\n\
                  [vms.sealed]\nimage = \"deb\"\negress = \"none\"\n";
    let lab = lab::Lab::new(
        pve::FakeOptions::default(),
        &format!("{}\n{sealed}", lab::REMOTE),
    );
    lab.create_pool();
    lab.env.json(&["up", "remote", "--no-wait"]);
    assert_eq!(lab.env.status("remote")["egress"], json!("open"));
    let report = lab.env.json(&["egress", "remote"]);
    assert_eq!(report["policy"], json!("open"));
    assert_eq!(report["tunnel"], Value::Null);

    let err = lab
        .env
        .fails(&["up", "sealed", "--backend", "lab", "--no-wait"]);
    assert!(
        err.contains(
            "does not support egress policies: restrict the VM with Proxmox firewall rules"
        ),
        "{err}"
    );
    assert!(lab.fake.vms().values().all(|v| v.name != "sealed"));
    lab.no_violations();
}
