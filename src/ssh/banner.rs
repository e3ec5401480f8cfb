//! Waiting for a guest's SSH banner without overrunning its sshd.
//!
//! Through a user-mode (SLIRP) port forward, a booting guest goes through
//! three phases, as seen from the host:
//! 1. its network is not up: the forward accepts each connection and holds it
//!    silent, resending its SYN to the guest until the guest answers or 75 s
//!    have passed. Closing the host side does not cancel it: SLIRP notices
//!    only once the guest has answered, so every connection opened in this
//!    phase reaches the guest when its network comes up;
//! 2. its network is up but nothing listens: the guest resets the connection
//!    and the forward closes it at once;
//! 3. sshd listens: every connection starts one more sshd (OpenSSH re-executes
//!    itself for each), which under emulation can take seconds to send its
//!    banner.
//!
//! sshd drops new connections at random once 10 are starting at the same
//! time (`MaxStartups 10:30:100`, which is also what it tells the one it
//! drops). Probing carelessly piles them up: every connection given up on
//! in phase 1 still starts an sshd in phase 3, and on a loaded host the
//! user's first `ssh` after `up` is then the one sshd drops
//! ("kex_exchange_identification: Connection closed by remote host"). So
//! this module never has more than [`MAX_PENDING`] connections out at once,
//! in any phase:
//! - until the guest has answered anything (phase 1), connections are opened
//!   at growing intervals (0.5 s, 1 s, 2 s) and all of them are kept: when
//!   the network comes up each is refused (phase 2) or served (phase 3) as
//!   SLIRP resends its SYN, and the staggered resends find the guest sooner
//!   than one would. One is replaced only once SLIRP is done with it (75 s).
//!   The price: SLIRP resends at most every 12 s, so a guest whose network
//!   comes up late may be noticed a few seconds after it could be;
//! - once it has (phases 2 and 3), a silent connection is an sshd at work: it
//!   is kept and read until it answers, and new ones beside it are opened
//!   ever more slowly (0.5 s, 1 s, 2 s, ... up to 8 s).
//!
//! Connections that are refused or closed are retried within milliseconds, so
//! a banner is still seen as soon as sshd sends it. On a direct address (a
//! Proxmox guest's own) there is no forward: a refused connect is phase 2.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::backoff::Backoff;

/// How often pending connections are read, and the retry after a refused or
/// closed connection: 2 ms growing to 10 ms (a refused or reset connection
/// costs the guest next to nothing, so sshd is seen within 10 ms).
const POLL_FIRST: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(10);
/// How long a silent connection is waited on before another is opened beside
/// it; it doubles with each one opened, up to [`PATIENCE_MAX`].
const PATIENCE_FIRST: Duration = Duration::from_millis(500);
const PATIENCE_MAX: Duration = Duration::from_secs(8);
/// At most this many connections are out at once, whatever the phase, so
/// that with the user's own `ssh` and the host-key read sshd stays below the
/// 10 starting connections at which it begins to drop them.
const MAX_PENDING: usize = 4;
/// Once the guest has answered, a connection silent this long is an sshd
/// that is stuck: it is dropped and another opened.
const MAX_AGE: Duration = Duration::from_secs(60);
/// SLIRP stops resending a connection's SYN after 75 s and closes it; a
/// connection opened before the guest answered and closed without a word
/// after this long was given up on by SLIRP, not refused by the guest.
const SLIRP_GIVES_UP: Duration = Duration::from_secs(70);
/// After this long SLIRP has delivered or dropped a connection: one opened
/// before the guest answered and still silent is dropped then.
const SLIRP_DELIVERS: Duration = Duration::from_secs(76);
/// How often the caller is asked whether the guest still runs.
const ALIVE_CHECK: Duration = Duration::from_millis(100);
/// How long an accepted connection must have gone without a word to count as
/// an sshd that is slow or stuck: behind a port forward a refused one is also
/// accepted first, and its reset comes milliseconds later.
const SILENT_AFTER: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// An identification line is at most 255 bytes (RFC 4253, 4.2).
const MAX_LINE: usize = 256;

/// Waits until 127.0.0.1:`port` answers with an SSH banner. `still_running` is
/// asked every 100 ms so a guest that died is reported at once.
pub fn wait_for_banner(
    port: u16,
    timeout: Duration,
    still_running: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    wait_for_banner_at(
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        timeout,
        POLL_MAX,
        still_running,
    )
}

/// [`wait_for_banner`] for any address; a refused connection is retried after
/// 2 ms growing to `retry_max`.
pub fn wait_for_banner_at(
    addr: SocketAddr,
    timeout: Duration,
    retry_max: Duration,
    mut still_running: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    // Whether the guest has answered anything: from then on a silent
    // connection is an sshd at work, not a guest without network.
    let mut answered = false;
    let (mut opened, mut refused, mut busy) = (0u32, 0u32, 0u32);
    let mut patience = PATIENCE_FIRST;
    let mut next_open = start;
    let mut retry = Backoff::new(POLL_FIRST, retry_max.max(POLL_FIRST));
    let mut poll = Backoff::new(POLL_FIRST, POLL_MAX);
    let mut next_alive_check = start + ALIVE_CHECK;
    loop {
        let mut i = 0;
        while i < pending.len() {
            match pending[i].read() {
                Answer::Banner(_) => {
                    tracing::debug!(
                        "{addr}: banner after {:?} on a connection {:?} old, {opened} opened, {refused} refused",
                        start.elapsed(),
                        pending[i].opened.elapsed(),
                    );
                    return Ok(start.elapsed());
                }
                Answer::Nothing => i += 1,
                Answer::Closed
                    if pending[i].blind && pending[i].opened.elapsed() >= SLIRP_GIVES_UP =>
                {
                    // SLIRP gave up on reaching a guest without network: its
                    // place is taken at once.
                    pending.remove(i);
                    next_open = Instant::now();
                }
                Answer::Closed => {
                    // Nothing listens yet: try again within milliseconds.
                    pending.remove(i);
                    refused += 1;
                    answered = true;
                    patience = PATIENCE_FIRST;
                    next_open = Instant::now() + retry.step();
                }
                Answer::Busy => {
                    // sshd is up but refused this one ("Exceeded MaxStartups").
                    pending.remove(i);
                    busy += 1;
                    answered = true;
                }
            }
        }
        let now = Instant::now();
        // A connection opened before the guest answered is kept as long as
        // SLIRP may still deliver it (dropping it would not stop that); one
        // opened after, for a minute. Either way a connection that hangs
        // (a guest that rebooted, an sshd stuck) does not hold its place.
        pending.retain(|p| {
            let limit = if p.blind { SLIRP_DELIVERS } else { MAX_AGE };
            now.duration_since(p.opened) < limit
        });
        if now >= next_open {
            if pending.len() >= MAX_PENDING {
                // Enough out at once: wait for one of them.
                next_open = now + patience;
            } else {
                match Pending::open(&addr) {
                    Ok(mut p) => {
                        p.blind = !answered;
                        pending.push_back(p);
                        opened += 1;
                        next_open = Instant::now() + patience;
                        patience = (patience * 2).min(PATIENCE_MAX);
                        // Read soon: a refused one is closed within milliseconds.
                        poll = Backoff::new(POLL_FIRST, POLL_MAX);
                    }
                    Err(e) => {
                        if e.kind() == ErrorKind::ConnectionRefused {
                            // A direct address (no port forward): the guest
                            // is up and nothing listens yet.
                            refused += 1;
                            answered = true;
                        }
                        next_open = Instant::now() + retry.step();
                    }
                }
            }
        }
        if now >= next_alive_check {
            if !still_running()? {
                bail!("the VM stopped before SSH came up");
            }
            next_alive_check = Instant::now() + ALIVE_CHECK;
        }
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "no SSH banner on {addr} after {}s: {}",
                now.duration_since(start).as_secs(),
                what_was_seen(
                    answered,
                    (opened, refused, busy),
                    pending
                        .iter()
                        .filter(|p| !p.blind && now.duration_since(p.opened) >= SILENT_AFTER)
                        .count(),
                )
            );
        }
        let mut wake = next_open.min(deadline).min(next_alive_check);
        if !pending.is_empty() {
            wake = wake.min(now + poll.step());
        }
        std::thread::sleep(wake.saturating_duration_since(now));
    }
}

/// What a wait that found no banner saw, so that a guest without network, a
/// guest without sshd and a busy sshd are told apart.
/// `silent` counts the connections opened after the guest answered that are
/// still open after [`SILENT_AFTER`]: the guest accepted them (a refused one
/// is closed within milliseconds).
fn what_was_seen(
    answered: bool,
    (opened, refused, busy): (u32, u32, u32),
    silent: usize,
) -> String {
    if !answered {
        return format!(
            "the guest never answered on its network ({opened} connection(s) opened, none refused or served): \
             it is still booting, hung, or its network is down; its console says which"
        );
    }
    if silent > 0 {
        return format!(
            "the SSH port accepted {silent} connection(s) but sent no banner on them: sshd is slow or stuck"
        );
    }
    if busy > 0 {
        return format!(
            "sshd answered {busy} connection(s) with a line that is not an SSH banner (such as \"Exceeded MaxStartups\"), and no other one got a banner"
        );
    }
    if refused > 0 {
        return format!(
            "the guest refused the SSH port {refused} time(s) and never served it: \
             is sshd installed and enabled in the image?"
        );
    }
    format!("{opened} connection(s) opened, none answered")
}

/// The first line the server sends, if it is an SSH identification string,
/// waiting at most 3 s for it once connected. (A user-mode forward accepts
/// connections before the guest listens; only the banner proves sshd is up.)
pub fn read_banner(addr: &SocketAddr) -> Option<String> {
    let stream = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut probe = Pending::new(stream);
    // Silent for 3 s: what came so far is all there is.
    let answer = match probe.read() {
        Answer::Nothing => judge(&probe.got, true),
        answer => answer,
    };
    match answer {
        Answer::Banner(line) => Some(line),
        _ => None,
    }
}

/// One probe connection (read without blocking while waiting for a banner).
struct Pending {
    stream: TcpStream,
    opened: Instant,
    got: Vec<u8>,
    /// Opened before the guest had answered anything: maybe held by SLIRP.
    blind: bool,
}

/// What a pending connection said so far.
#[derive(Debug, PartialEq)]
enum Answer {
    /// The identification line, e.g. `SSH-2.0-OpenSSH_9.2p1`.
    Banner(String),
    /// Still silent.
    Nothing,
    /// Closed or reset without a word: nothing listens.
    Closed,
    /// A first line that is not an SSH banner (a busy sshd says why it refuses).
    Busy,
}

impl Pending {
    fn open(addr: &SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT)?;
        stream.set_nonblocking(true)?;
        Ok(Self::new(stream))
    }

    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            opened: Instant::now(),
            got: Vec::new(),
            blind: false,
        }
    }

    /// Reads what has come; [`Answer::Nothing`] when the server is silent
    /// (for a blocking stream: for its whole read timeout).
    fn read(&mut self) -> Answer {
        let mut chunk = [0u8; MAX_LINE];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return judge(&self.got, true),
                Ok(n) => {
                    self.got.extend_from_slice(&chunk[..n]);
                    let answer = judge(&self.got, false);
                    if answer != Answer::Nothing {
                        return answer;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Answer::Nothing;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return judge(&self.got, true),
            }
        }
    }
}

/// What the bytes a server sent say: its first line once complete, or all of
/// it once the server has `ended` (closed, reset, or gone silent) or sent
/// [`MAX_LINE`] bytes without a line end.
fn judge(got: &[u8], ended: bool) -> Answer {
    let line = match got.iter().position(|&b| b == b'\n') {
        Some(end) => &got[..end],
        None if got.is_empty() && ended => return Answer::Closed,
        None if ended || got.len() >= MAX_LINE => got,
        None => return Answer::Nothing,
    };
    let line = String::from_utf8_lossy(line).trim().to_string();
    if line.starts_with("SSH-") {
        Answer::Banner(line)
    } else {
        Answer::Busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[test]
    fn banner_must_be_ssh() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"HTTP/1.0 200 OK\r\n").unwrap();
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"SSH-2.0-dropbear\r\n").unwrap();
        });
        assert_eq!(read_banner(&addr), None);
        assert_eq!(read_banner(&addr).as_deref(), Some("SSH-2.0-dropbear"));
        server.join().unwrap();
    }

    #[test]
    fn waiting_stops_when_the_vm_dies() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let err = wait_for_banner(port, Duration::from_secs(30), || Ok(false)).unwrap_err();
        assert!(err.to_string().contains("stopped"), "{err}");
    }

    /// A guest whose network is up (unless `listening_first`, it closes the
    /// first connection: nothing listens yet) and whose sshd then takes
    /// `delay` to send each connection its banner, counting the connections
    /// it was given.
    fn slow_server(
        delay: Duration,
        listening_first: bool,
    ) -> (u16, Arc<AtomicUsize>, Arc<Mutex<Vec<TcpStream>>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let kept = Arc::new(Mutex::new(Vec::new()));
        let (count, keep) = (accepted.clone(), kept.clone());
        std::thread::spawn(move || {
            for stream in l.incoming() {
                let Ok(mut stream) = stream else { return };
                if count.fetch_add(1, Ordering::SeqCst) == 0 && !listening_first {
                    continue;
                }
                keep.lock().unwrap().push(stream.try_clone().unwrap());
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2p1\r\n");
                });
            }
        });
        (port, accepted, kept)
    }

    #[test]
    fn a_slow_sshd_is_waited_on_not_flooded() {
        // Each banner takes 3 s: a probe that gave up after half a second
        // would have started six sshds; patience that doubles starts three
        // (at 0, 0.5 and 1.5 s, after the one refused) and takes the first banner.
        let (port, accepted, _kept) = slow_server(Duration::from_secs(3), false);
        let took = wait_for_banner(port, Duration::from_secs(30), || Ok(true)).unwrap();
        assert!(took >= Duration::from_secs(3), "{took:?}");
        assert!(took < Duration::from_secs(6), "{took:?}");
        let n = accepted.load(Ordering::SeqCst);
        assert!(n <= 1 + 3, "{n} connections for one banner");
    }

    #[test]
    fn an_sshd_that_listened_before_the_network_is_not_flooded_either() {
        // Nothing is ever refused, so a silent connection may be a guest
        // without network: all are kept, opened at 0, 0.5 and 1.5 s; the
        // first one's banner comes at 3 s.
        let (port, accepted, _kept) = slow_server(Duration::from_secs(3), true);
        let took = wait_for_banner(port, Duration::from_secs(30), || Ok(true)).unwrap();
        assert!(took >= Duration::from_secs(3), "{took:?}");
        assert!(took < Duration::from_secs(4), "{took:?}");
        let n = accepted.load(Ordering::SeqCst);
        assert!(n <= 3, "{n} connections for one banner");
    }

    #[test]
    fn connections_given_up_on_before_the_network_do_not_pile_up_on_sshd() {
        // A guest without network for 12 s whose sshd listened first: like
        // SLIRP, the listener hands over every connection once the "network"
        // is up, also those the prober has closed by then, and each one is an
        // sshd that answers after 0.5 s. Replacing silent connections would
        // have started six sshds by then; at most four are ever out.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(12));
            for stream in l.incoming() {
                let Ok(mut stream) = stream else { return };
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(500));
                    let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2p1\r\n");
                    std::thread::sleep(Duration::from_secs(5));
                });
            }
        });
        let took = wait_for_banner(port, Duration::from_secs(30), || Ok(true)).unwrap();
        assert!(took >= Duration::from_secs(12), "{took:?}");
        assert!(took < Duration::from_secs(14), "{took:?}");
        // Let the listener take what is left in its queue.
        std::thread::sleep(Duration::from_millis(300));
        let n = accepted.load(Ordering::SeqCst);
        assert!(n <= MAX_PENDING, "{n} sshds started for one banner");
    }

    #[test]
    fn a_closed_connection_is_retried_at_once() {
        // Closes the first connections without a word (nothing listens in
        // the guest yet), then answers: the banner is seen without a wait.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for _ in 0..5 {
                drop(l.accept().unwrap());
            }
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"SSH-2.0-dropbear\r\n").unwrap();
            s
        });
        let took = wait_for_banner(port, Duration::from_secs(30), || Ok(true)).unwrap();
        assert!(took < Duration::from_millis(400), "{took:?}");
        drop(server.join().unwrap());
    }

    /// A port whose every connection is accepted, then closed after `delay`
    /// without a word.
    fn port_that_closes_after(delay: Duration) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in l.incoming() {
                let Ok(stream) = stream else { return };
                if delay.is_zero() {
                    drop(stream);
                } else {
                    std::thread::spawn(move || {
                        std::thread::sleep(delay);
                        drop(stream);
                    });
                }
            }
        });
        port
    }

    #[test]
    fn a_port_that_always_closes_ends_at_the_deadline() {
        let port = port_that_closes_after(Duration::ZERO);
        let start = Instant::now();
        let err = wait_for_banner(port, Duration::from_millis(300), || Ok(true)).unwrap_err();
        assert!(err.to_string().contains("no SSH banner"), "{err}");
        assert!(err.to_string().contains("refused the SSH port"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_refusal_that_comes_late_is_still_a_refusal() {
        // As behind a port forward: every connection is accepted, then
        // closed a little later (the reset of a guest under load), never served.
        let port = port_that_closes_after(Duration::from_millis(150));
        let err = wait_for_banner(port, Duration::from_millis(600), || Ok(true)).unwrap_err();
        assert!(err.to_string().contains("refused the SSH port"), "{err}");
    }

    #[test]
    fn a_guest_that_never_answers_is_told_from_one_without_sshd() {
        // A listener that accepts nothing: connections are held silent, as
        // a port forward holds them for a guest without network.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let err = wait_for_banner(port, Duration::from_millis(300), || Ok(true)).unwrap_err();
        assert!(
            err.to_string().contains("never answered on its network"),
            "{err}"
        );
        drop(l);
    }

    #[test]
    fn an_sshd_that_accepts_but_never_answers_is_named() {
        // Refused once (the guest booting), then accepted and silent.
        let (port, _accepted, _kept) = slow_server(Duration::from_secs(30), false);
        let err = wait_for_banner(port, Duration::from_millis(1500), || Ok(true)).unwrap_err();
        assert!(err.to_string().contains("sent no banner"), "{err}");
    }

    #[test]
    fn a_busy_answer_is_not_a_banner() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"Exceeded MaxStartups\r\n").unwrap();
            drop(s);
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"SSH-2.0-OpenSSH_9.2p1\r\n").unwrap();
            s
        });
        let mut first = Pending::open(&addr).unwrap();
        let mut answer = Answer::Nothing;
        for _ in 0..500 {
            answer = first.read();
            if answer != Answer::Nothing {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(answer, Answer::Busy);
        wait_for_banner(addr.port(), Duration::from_secs(10), || Ok(true)).unwrap();
        drop(server.join().unwrap());
    }
}
