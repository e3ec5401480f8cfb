//! The libvirt connection, kept usable across libvirtd restarts.
//!
//! A session libvirtd exits after two idle minutes, and may be restarted or
//! killed at any time. libvirt's default event loop runs on a thread of its own
//! (with keep-alive), so a connection whose daemon went away is known dead
//! (`is_alive` false) as soon as its socket closes. Every use takes the
//! connection through [`Conn::get`], which opens a new one (qemu:///session
//! spawns a new libvirtd) when the current one is dead. Each new connection gets
//! the next generation number, so a caller can tell that the connection died
//! under it ([`Conn::died_since`]) even after someone else reconnected.

use std::sync::{Mutex, Once, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use virt::connect::Connect;
use virt::enumutil::Enum;
use virt::error::{ErrorDomain, ErrorNumber};

/// Keep-alive probes every this many seconds…
const KEEPALIVE_INTERVAL_SECS: i32 = 5;
/// …and the connection counts as dead after this many unanswered ones.
const KEEPALIVE_COUNT: u32 = 3;
/// How long a reconnect keeps trying while a new libvirtd starts.
const RECONNECT_PATIENCE: Duration = Duration::from_secs(10);
/// Pause between reconnect attempts.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// What a verb reports instead of libvirt's transport errors.
pub const LOST: &str = "lost the connection to libvirt (libvirtd stopped or restarted)";

/// libvirt's connection, replaced by a new one when it dies.
pub struct Conn {
    uri: String,
    current: RwLock<Current>,
    /// Held while reconnecting, so one thread opens the new connection.
    reconnecting: Mutex<()>,
}

struct Current {
    conn: Connect,
    generation: u64,
    /// The event callbacks registered on `conn`.
    callbacks: Vec<std::os::raw::c_int>,
}

impl Conn {
    /// Opens the first connection to `uri`.
    pub fn open(uri: &str) -> anyhow::Result<Self> {
        start_event_loop();
        let (conn, callbacks) = open(uri).with_context(|| {
            format!(
                "connecting to libvirt at {uri} (is libvirt installed, and for qemu:///system are you in the libvirt group?)"
            )
        })?;
        Ok(Self {
            uri: uri.to_string(),
            current: RwLock::new(Current {
                conn,
                generation: 0,
                callbacks,
            }),
            reconnecting: Mutex::new(()),
        })
    }

    /// The connection to use now: the current one while it is alive, else a
    /// new one.
    pub fn get(&self) -> anyhow::Result<Connect> {
        Ok(self.get_at()?.0)
    }

    /// [`Conn::get`] with the connection's generation.
    pub fn get_at(&self) -> anyhow::Result<(Connect, u64)> {
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if alive(&current.conn) {
                return Ok((current.conn.clone(), current.generation));
            }
        }
        self.reconnect()
    }

    /// The generation of the current connection (see [`Conn::died_since`]).
    pub fn generation(&self) -> u64 {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .generation
    }

    /// Whether the connection of `generation` has died: it was replaced, or it
    /// is the current one and no longer alive.
    pub fn died_since(&self, generation: u64) -> bool {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.generation != generation || !alive(&current.conn)
    }

    /// Opens a new connection unless someone else already did; waits up to
    /// [`RECONNECT_PATIENCE`] for libvirtd to come back.
    pub fn reconnect(&self) -> anyhow::Result<(Connect, u64)> {
        let _one = self.reconnecting.lock().unwrap_or_else(|e| e.into_inner());
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if alive(&current.conn) {
                return Ok((current.conn.clone(), current.generation));
            }
        }
        let deadline = Instant::now() + RECONNECT_PATIENCE;
        let (fresh, callbacks) = loop {
            match open(&self.uri) {
                Ok(opened) => break opened,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("reconnecting to libvirt at {}: {e:#}", self.uri);
                    std::thread::sleep(RECONNECT_PAUSE);
                }
                Err(e) => {
                    return Err(e.context(format!(
                        "{LOST}, and reconnecting to {} failed for {} s; check that libvirt runs (virsh -c {} list), then run the command again",
                        self.uri,
                        RECONNECT_PATIENCE.as_secs(),
                        self.uri
                    )));
                }
            }
        };
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        super::events::deregister(&current.conn, &current.callbacks);
        current.conn = fresh;
        current.callbacks = callbacks;
        current.generation += 1;
        tracing::info!(
            "reconnected to libvirt at {} (connection {}; libvirtd had stopped or restarted)",
            self.uri,
            current.generation
        );
        Ok((current.conn.clone(), current.generation))
    }
}

/// Whether a libvirt error is the transport failing: libvirtd went away
/// ("End of file while reading data", "Broken pipe", "client socket is closed").
pub fn is_transport_error(e: &virt::error::Error) -> bool {
    let rpc = matches!(
        e.domain(),
        Enum::Known(ErrorDomain::Rpc | ErrorDomain::Remote)
    );
    let code = e.code();
    matches!(code, Enum::Known(ErrorNumber::NoConnect))
        || (rpc
            && matches!(
                code,
                Enum::Known(
                    ErrorNumber::SystemError | ErrorNumber::InternalError | ErrorNumber::Rpc
                )
            ))
}

fn alive(conn: &Connect) -> bool {
    conn.is_alive().unwrap_or(false)
}

/// A new connection with keep-alive and the event callbacks (their ids).
fn open(uri: &str) -> anyhow::Result<(Connect, Vec<std::os::raw::c_int>)> {
    let conn = Connect::open(Some(uri)).map_err(|e| anyhow!("{}", e.message()))?;
    // Keep-alive finds a libvirtd that hangs without closing the socket.
    if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL_SECS, KEEPALIVE_COUNT) {
        tracing::debug!("libvirt keep-alive not enabled: {}", e.message());
    }
    let callbacks = super::events::register(&conn);
    Ok((conn, callbacks))
}

/// Registers libvirt's default event loop and runs it on a thread, once per
/// process. It must be registered before the first connection is opened; it
/// is what notices a closed socket (and runs keep-alive) between calls.
fn start_event_loop() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::warn!(
                "libvirt's event loop could not be registered ({}); a restarted libvirtd is noticed on the next call instead",
                e.message()
            );
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!("libvirt's event loop: {}", e.message());
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("starting libvirt's event loop thread: {e}");
        }
    });
}
