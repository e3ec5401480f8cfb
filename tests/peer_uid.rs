//! The daemon refuses connections from other uids (SO_PEERCRED). Acting as a
//! second user needs root, so this test is ignored by a plain `cargo test`;
//! `.ci/test` runs it as root with `--ignored`, against a daemon it starts as
//! the unprivileged test user.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
#[ignore = "needs root to act as a second user; .ci/test runs it"]
fn a_connection_from_another_uid_is_refused() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "run as root: it starts the daemon as another user and connects as root"
    );
    let name = std::env::var("AGENTVM_TEST_USER").unwrap_or_else(|_| "agentvm-test".into());
    let user = nix::unistd::User::from_name(&name)
        .unwrap()
        .unwrap_or_else(|| panic!("no user {name}"));
    let dir = tempfile::Builder::new()
        .prefix("agentvm-uid-")
        .tempdir()
        .unwrap();
    nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid)).unwrap();
    let socket = dir.path().join("agentvm.sock");
    let mut daemon = Command::new("runuser")
        .args(["-u", &name, "--", "env", "-u", "XDG_RUNTIME_DIR"])
        .arg(format!("HOME={}", user.dir.display()))
        .arg(format!(
            "AGENTVM_HOME={}",
            dir.path().join("home").display()
        ))
        .arg(format!("AGENTVM_SOCKET={}", socket.display()))
        .arg(env!("CARGO_BIN_EXE_agentvm"))
        .arg("daemon")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        if let Ok(stream) = UnixStream::connect(&socket) {
            break stream;
        }
        if let Some(status) = daemon.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(daemon.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the daemon exited ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    // root can open the 0600 socket file; the daemon must still refuse uid 0.
    let mut writer = stream.try_clone().unwrap();
    writer
        .write_all(b"{\"version\":1,\"request\":{\"op\":\"hello\"}}\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["type"], "error", "{reply}");
    let message = reply["message"].as_str().unwrap();
    assert!(message.starts_with("refused"), "{message}");
    assert!(
        message.contains(&format!("serves uid {}", user.uid)),
        "{message}"
    );
    assert!(message.contains("you are uid 0"), "{message}");
}
