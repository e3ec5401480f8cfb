//! Latency benchmark on the test guest, each figure beside its floor measured
//! in the same run:
//!
//! - readiness: from the guest's sshd sending its first banner (as QEMU's
//!   own capture of the guest's network, `filter-dump`, stamps it) to
//!   `agentvm up` returning. Nothing but `up` talks to the guest: a prober
//!   of the bench's own would compete with `up` for the guest's sshd, which
//!   under TCG serves one connection after the other; floor: one `virsh
//!   qemu-agent-command … guest-ping` process (what `up` must at least do
//!   once the banner is there);
//! - warm `exec VM -- true` end to end; floor: one whole `virsh
//!   qemu-agent-command … guest-ping` process.
//!
//! Prints a table and one JSON line; asserts nothing about speed. Run with
//! `.ci/bench latency` (or `cargo bench --bench latency` as an unprivileged user).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{Env, GUEST_TIMEOUT};

const READY_RUNS: usize = 5;
const EXEC_RUNS: usize = 30;

fn main() {
    let mut env = Env::new();
    // The capture hooks QEMU's SLIRP netdev (passt has none to hook).
    env.set_env(agentvm::paths::ENV_NETWORK, "slirp");
    let port = free_port();
    env.write_fleet(&format!("[vms.bench-lat]\nssh_port = {port}\n"));
    env.owns(&["bench-lat"]);

    let mut wire = Vec::new();
    for run in 0..READY_RUNS {
        let _ = env.agentvm(&["destroy", "--yes", "bench-lat"]);
        let pcap = env.dir.path().join(format!("ready-{run}.pcap"));
        wire.push(readiness_on_the_wire(&env, port, &pcap));
    }

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
    let wire = support::median(wire);

    support::report(
        "latency on the test guest (TCG), median ms:",
        &[
            support::Figure {
                name: "readiness: banner on the wire -> up returns",
                unit: "ms",
                agentvm: wire,
                floor: exec_floor,
                floor_is: "one `virsh qemu-agent-command guest-ping` process",
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

/// Milliseconds from the guest's sshd putting its first banner on the wire
/// to `up` returning, with nothing but `up` talking to the guest. QEMU
/// captures the guest's network to `pcap` from the moment the domain exists
/// (`filter-dump`, added over QMP). Its stamps follow the guest's virtual
/// clock (which runs with the host's while the guest runs) from a whole
/// second, so one frame is anchored to the host's clock: after `up` returns
/// the bench connects once more, and the SYN the forward sends the guest
/// for it is captured within the millisecond.
fn readiness_on_the_wire(env: &Env, port: u16, pcap: &std::path::Path) -> f64 {
    // libvirt would print "domain not found" for every look below.
    virt::error::clear_error_callback();
    let conn = virt::connect::Connect::open(Some("qemu:///session")).expect("libvirt");
    let up = {
        let mut cmd = env.command(&["up", "bench-lat", "--timeout", GUEST_TIMEOUT]);
        std::thread::spawn(move || {
            let out = cmd.output().expect("running agentvm up");
            let returned = Instant::now();
            assert!(out.status.success(), "up: {out:?}");
            returned
        })
    };
    // Attach the capture as soon as QEMU runs: the guest needs seconds to
    // bring up its network, so nothing it sends is missed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let dom = loop {
        if let Ok(dom) = conn.lookup_domain_by_name("agentvm-bench-lat")
            && dom.is_active().unwrap_or(false)
        {
            break dom;
        }
        assert!(
            Instant::now() < deadline && !up.is_finished(),
            "the domain did not start (or `up` ended first)"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let add = format!(
        r#"{{"execute":"object-add","arguments":{{"qom-type":"filter-dump","id":"bench-dump","netdev":{:?},"file":{:?}}}}}"#,
        agentvm::domain::SLIRP_NETDEV,
        pcap.display().to_string()
    );
    dom.qemu_monitor_command(&add, 0)
        .unwrap_or_else(|e| panic!("adding filter-dump: {e}"));
    let returned = up.join().expect("up");
    let anchor = Instant::now();
    let source_port = anchoring_connection(port);
    let (banner, syn) = banner_and_syn_from(pcap, source_port);
    // Where the banner was on the host's clock, relative to `returned`.
    let banner_after_returned =
        anchor.duration_since(returned).as_secs_f64() * 1000.0 - (syn - banner) as f64 / 1000.0;
    let ms = -banner_after_returned;
    eprintln!("readiness run (wire): {ms:.1} ms");
    ms
}

/// Connects to the forwarded SSH `port` and reads the banner; returns the
/// connection's local port, which the forward keeps as the source port of
/// the SYN it sends the guest.
fn anchoring_connection(port: u16) -> u16 {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .expect("connecting for the anchoring connection");
    let source_port = stream.local_addr().expect("local address").port();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut banner = [0u8; 4];
    stream
        .read_exact(&mut banner)
        .expect("a banner for the anchoring connection");
    assert_eq!(
        &banner, b"SSH-",
        "the anchoring connection got no SSH banner"
    );
    source_port
}

/// From QEMU's capture `pcap` (classic pcap, Ethernet frames), the stamps in
/// microseconds of the first frame from the guest's port 22 carrying `SSH-`
/// and of the first SYN sent to it from `source_port` after that (a resent
/// SYN would come later).
fn banner_and_syn_from(pcap: &std::path::Path, source_port: u16) -> (i64, i64) {
    let data = std::fs::read(pcap).unwrap_or_else(|e| panic!("{}: {e}", pcap.display()));
    assert!(
        data.len() >= 24 && data[..4] == [0xd4, 0xc3, 0xb2, 0xa1],
        "{}: not a little-endian pcap",
        pcap.display()
    );
    let u32_at = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
    let (mut banner, mut syn) = (None, None);
    let mut at = 24;
    while at + 16 <= data.len() {
        let stamp = i64::from(u32_at(at)) * 1_000_000 + i64::from(u32_at(at + 4));
        let len = u32_at(at + 8) as usize;
        let frame = &data[at + 16..(at + 16 + len).min(data.len())];
        at += 16 + len;
        // Ethernet, IPv4, TCP.
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 6 {
            continue;
        }
        let ip = &frame[14..];
        let Some(tcp) = ip
            .get(usize::from(ip[0] & 0x0f) * 4..)
            .filter(|t| t.len() >= 20)
        else {
            continue;
        };
        let (from_22, to_22) = (tcp[..2] == [0, 22], tcp[2..4] == [0, 22]);
        let flags = tcp[13];
        // After the banner: one of `up`'s own connections may have had the
        // same source port before.
        if to_22
            && flags & 0x12 == 0x02
            && banner.is_some()
            && syn.is_none()
            && tcp[..2] == source_port.to_be_bytes()
        {
            syn = Some(stamp);
        }
        let payload = tcp.get(usize::from(tcp[12] >> 4) * 4..).unwrap_or_default();
        if from_22 && banner.is_none() && payload.starts_with(b"SSH-") {
            banner = Some(stamp);
        }
    }
    let what = |x: Option<i64>, name: &str| {
        x.unwrap_or_else(|| panic!("{}: no {name} captured", pcap.display()))
    };
    (
        what(banner, "SSH banner"),
        what(syn, "SYN to port 22 from the anchoring connection"),
    )
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
