//! Port forwards on the real test guest: from the spec, added and removed live,
//! dropped at the next start, and refused when another VM holds the port.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{Env, GUEST_TIMEOUT};
use serde_json::{Value, json};

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the guest's server on 8000 says through host port `port`. SLIRP
/// accepts before the guest does, so an empty answer is tried again.
fn read_through(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut text = String::new();
        if let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let _ = stream.read_to_string(&mut text);
        }
        if !text.is_empty() || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn forwards(env: &Env, name: &str) -> Value {
    env.status(name)["forwards"].clone()
}

fn serve_hello(env: &Env, name: &str) {
    env.ok(&[
        "exec",
        name,
        "--",
        "/bin/sh",
        "-c",
        "printf '#!/bin/sh\\necho hello\\n' > /tmp/hello && chmod +x /tmp/hello && \
         (setsid busybox nc -ll -p 8000 -e /tmp/hello </dev/null >/dev/null 2>&1 &)",
    ]);
}

#[test]
fn forwards_from_the_spec_and_live() {
    let env = Env::new();
    let (port, live) = (free_port(), free_port());
    env.write_fleet(&format!(
        "[vms.fw-web]\nforwards = [\"{port}:8000\"]\n\n[vms.fw-clash]\nforwards = [\"{port}:80\"]\n"
    ));
    env.owns(&["fw-web", "fw-clash"]);
    env.ok(&["up", "fw-web", "--timeout", GUEST_TIMEOUT]);
    serve_hello(&env, "fw-web");

    let spec_forward =
        json!({"host_addr": "127.0.0.1", "host_port": port, "guest_port": 8000, "live": false});
    assert_eq!(forwards(&env, "fw-web"), json!([spec_forward]));
    assert_eq!(read_through(port), "hello\n");

    // Another VM asking for the same host port is refused, naming the holder.
    let err = env.fails(&["up", "fw-clash", "--timeout", GUEST_TIMEOUT]);
    assert!(
        err.contains(&format!(
            "host port {port} is already used by VM \"fw-web\""
        )),
        "{err}"
    );

    // Live: added, listed, reachable, removed.
    let added = env.json(&["forward", "fw-web", &format!("{live}:8000")]);
    let live_forward =
        json!({"host_addr": "127.0.0.1", "host_port": live, "guest_port": 8000, "live": true});
    assert_eq!(added, json!([spec_forward, live_forward]));
    assert_eq!(forwards(&env, "fw-web"), added);
    assert_eq!(env.json(&["forward", "fw-web"]), added);
    assert_eq!(read_through(live), "hello\n");
    let err = env.fails(&["forward", "fw-web", &format!("{port}:22")]);
    assert!(
        err.contains(&format!("host port {port} is already forwarded")),
        "{err}"
    );
    let err = env.fails(&["forward", "fw-web", "--remove", &port.to_string()]);
    assert!(
        err.contains("remove it from forwards in agentvm.toml"),
        "{err}"
    );

    let removed = env.json(&["forward", "fw-web", "--remove", &live.to_string()]);
    assert_eq!(removed, json!([spec_forward]));
    assert_eq!(forwards(&env, "fw-web"), removed);
    let refused = TcpStream::connect((Ipv4Addr::LOCALHOST, live)).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(read_through(port), "hello\n", "the spec's forward stays");

    // A live forward lasts until the VM stops; the next start says it is gone.
    env.json(&["forward", "fw-web", &format!("{live}:8000")]);
    env.ok(&["down", "fw-web", "--timeout", "30"]);
    assert_eq!(env.json(&["forward", "fw-web"]), json!([spec_forward]));
    assert_eq!(forwards(&env, "fw-web"), json!([spec_forward]));
    let up = env.agentvm(&["up", "fw-web", "--timeout", GUEST_TIMEOUT]);
    let said = String::from_utf8_lossy(&up.stderr);
    assert!(up.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "live forwards dropped at this start: 127.0.0.1:{live}:8000"
        )),
        "{said}"
    );
    assert_eq!(forwards(&env, "fw-web"), json!([spec_forward]));
    assert_eq!(env.status("fw-web")["restart_needed"], false);
}
