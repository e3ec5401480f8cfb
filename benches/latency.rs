//! Latency benchmark on the test guest, each figure beside its floor measured
//! in the same run:
//!
//! - readiness: from the guest first answering SSH (a prober reads its
//!   connections every millisecond) to `agentvm up` returning; floor: one banner read plus
//!   one `virsh qemu-agent-command … guest-ping` process (what `up` must at least
//!   do once the guest is ready);
//! - warm `exec VM -- true` end to end; floor: one whole `virsh
//!   qemu-agent-command … guest-ping` process.
//!
//! Prints a table and one JSON line; asserts nothing about speed. Run with
//! `.ci/bench latency` (or `cargo bench --bench latency` as an unprivileged user).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Env, GUEST_TIMEOUT};

const READY_RUNS: usize = 5;
const EXEC_RUNS: usize = 30;
/// Connections the readiness prober keeps open at most.
const PROBES: usize = 3;

fn main() {
    let env = Env::new();
    let port = free_port();
    env.write_fleet(&format!("[vms.bench-lat]\nssh_port = {port}\n"));
    env.owns(&["bench-lat"]);

    let mut ready = Vec::new();
    for _ in 0..READY_RUNS {
        let _ = env.agentvm(&["destroy", "--yes", "bench-lat"]);
        ready.push(readiness(&env, port));
    }
    let ready_floor = support::median(
        (0..EXEC_RUNS)
            .map(|_| {
                let start = Instant::now();
                agentvm::ssh::read_banner(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
                    .expect("a banner from the running guest");
                start.elapsed().as_secs_f64() * 1000.0 + virsh_ping("bench-lat")
            })
            .collect(),
    );

    env.ok(&["exec", "bench-lat", "--", "true"]);
    let exec = support::median(
        (0..EXEC_RUNS)
            .map(|_| {
                let start = Instant::now();
                env.ok(&["exec", "bench-lat", "--", "true"]);
                start.elapsed().as_secs_f64() * 1000.0
            })
            .collect(),
    );
    let exec_floor = support::median((0..EXEC_RUNS).map(|_| virsh_ping("bench-lat")).collect());
    let ready = support::median(ready);

    support::report(
        "latency on the test guest (TCG), median ms:",
        &[
            support::Figure {
                name: "readiness: SSH answers -> up returns",
                unit: "ms",
                agentvm: ready,
                floor: ready_floor,
                floor_is: "one banner read + one `virsh qemu-agent-command guest-ping`",
                target: Some(100.0),
            },
            support::Figure {
                name: "warm exec VM -- true",
                unit: "ms",
                agentvm: exec,
                floor: exec_floor,
                floor_is: "one `virsh qemu-agent-command guest-ping` process",
                target: Some(20.0),
            },
        ],
    );
}

/// Milliseconds from the guest's first SSH banner to `up` returning. The
/// prober keeps every connection it opens and reads them all every
/// millisecond, so it sees the first banner sshd sends on any of them however
/// long sshd takes to send it; it opens another at once when one is refused,
/// and every 100 ms while they are silent (a guest without network yet), at
/// most [`PROBES`] at once (the guest's sshd limits unauthenticated
/// connections from one address; `up` has its own beside these). It
/// keeps going after `up` returns until it has seen a banner (a prober slower
/// than `up` would show as a negative figure, not hide).
fn readiness(env: &Env, port: u16) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let first: Arc<Mutex<Option<Instant>>> = Arc::default();
    let prober = {
        let (stop, first) = (stop.clone(), first.clone());
        std::thread::spawn(move || {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let mut open: Vec<(TcpStream, Vec<u8>)> = Vec::new();
            let mut next_open = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let mut i = 0;
                while i < open.len() {
                    match read_some(&mut open[i]) {
                        Probe::Banner => {
                            *first.lock().unwrap() = Some(Instant::now());
                            return;
                        }
                        Probe::Silent => i += 1,
                        Probe::Closed => {
                            open.swap_remove(i);
                            next_open = Instant::now();
                        }
                    }
                }
                if Instant::now() >= next_open && open.len() < PROBES {
                    if let Ok(stream) =
                        TcpStream::connect_timeout(&addr, Duration::from_millis(100))
                    {
                        let _ = stream.set_nonblocking(true);
                        open.push((stream, Vec::new()));
                    }
                    next_open = Instant::now() + Duration::from_millis(100);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    env.ok(&["up", "bench-lat", "--timeout", GUEST_TIMEOUT]);
    let returned = Instant::now();
    let deadline = returned + Duration::from_secs(10);
    while !prober.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    prober.join().unwrap();
    let first = first.lock().unwrap().expect("the prober saw the banner");
    let ms = if first > returned {
        -(first.duration_since(returned).as_secs_f64() * 1000.0)
    } else {
        returned.duration_since(first).as_secs_f64() * 1000.0
    };
    eprintln!("readiness run: {ms:.1} ms");
    ms
}

enum Probe {
    Banner,
    Silent,
    Closed,
}

/// Reads what a prober connection has; `Banner` once it starts with `SSH-`
/// (SLIRP accepts before the guest listens, then closes: only the banner
/// proves sshd is up).
fn read_some((stream, got): &mut (TcpStream, Vec<u8>)) -> Probe {
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => Probe::Closed,
        Ok(n) => {
            got.extend_from_slice(&buf[..n]);
            if got.starts_with(b"SSH-") {
                Probe::Banner
            } else if got.len() >= 4 {
                Probe::Closed
            } else {
                Probe::Silent
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Probe::Silent,
        Err(_) => Probe::Closed,
    }
}

/// One whole `virsh qemu-agent-command VM guest-ping` process, in ms.
fn virsh_ping(vm: &str) -> f64 {
    let start = Instant::now();
    support::virsh(&[
        "qemu-agent-command",
        &format!("agentvm-{vm}"),
        r#"{"execute":"guest-ping"}"#,
    ]);
    start.elapsed().as_secs_f64() * 1000.0
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
