//! libvirt's domain events as something a thread can wait on: every lifecycle
//! event (started, stopped, shut down, …) and every guest-agent lifecycle
//! event (its port opened or closed in the guest) of a domain bumps that
//! domain's count and wakes the waiters. Waits that check a condition (the VM
//! is off, the agent answers) check it again as soon as anything happened to
//! the domain instead of sleeping a poll interval.
//!
//! Events need libvirt's event loop (`conn::start_event_loop`) and are
//! registered on every connection as it is opened. A connection on which they
//! could not be registered still works: the waits keep a fallback poll, so a
//! missed event costs at most that interval, never a hang.

use std::collections::HashMap;
use std::ffi::CStr;
use std::os::raw::{c_int, c_void};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::sys;

/// How many events each domain (by libvirt name) has had, and a wake-up for
/// those waiting on one.
struct Hub {
    counts: Mutex<HashMap<String, u64>>,
    changed: Condvar,
}

fn hub() -> &'static Hub {
    static HUB: OnceLock<Hub> = OnceLock::new();
    HUB.get_or_init(|| Hub {
        counts: Mutex::new(HashMap::new()),
        changed: Condvar::new(),
    })
}

/// The number of events domain `domain` has had so far: pass it to
/// [`wait_after`] to wait for the next one.
pub fn count(domain: &str) -> u64 {
    let counts = hub().counts.lock().unwrap_or_else(|e| e.into_inner());
    counts.get(domain).copied().unwrap_or(0)
}

/// Waits until domain `domain` has had an event beyond `seen`, or until
/// `until`; returns whether it had one.
pub fn wait_after(domain: &str, seen: u64, until: Instant) -> bool {
    let hub = hub();
    let mut counts = hub.counts.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if counts.get(domain).copied().unwrap_or(0) != seen {
            return true;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        counts = hub
            .changed
            .wait_timeout(counts, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Waits for `ready` to hold: it is checked at once, then after every event
/// of `domain`, and at the latest every `fallback` (events may be missed, e.g.
/// across a libvirtd restart). Gives up at `deadline` with the last error.
pub fn wait_for<T, E>(
    domain: &str,
    deadline: Instant,
    fallback: Duration,
    mut ready: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    loop {
        let seen = count(domain);
        if let Some(found) = ready()? {
            return Ok(Some(found));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        wait_after(domain, seen, deadline.min(now + fallback));
    }
}

fn bump(domain: &str) {
    tracing::trace!("libvirt event for {domain}");
    let hub = hub();
    let mut counts = hub.counts.lock().unwrap_or_else(|e| e.into_inner());
    *counts.entry(domain.to_string()).or_insert(0) += 1;
    hub.changed.notify_all();
}

/// Both event kinds carry (domain, int, int): lifecycle (event, detail) and
/// agent lifecycle (state, reason). Only the domain matters here.
unsafe extern "C" fn on_domain_event(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _what: c_int,
    _detail: c_int,
    _opaque: *mut c_void,
) -> c_int {
    // SAFETY: libvirt passes a valid domain for the length of the callback;
    // the name belongs to it and is only read here.
    let name = unsafe { sys::virDomainGetName(dom) };
    if !name.is_null() {
        // SAFETY: virDomainGetName returns a NUL-terminated string.
        let name = unsafe { CStr::from_ptr(name) };
        bump(&name.to_string_lossy());
    }
    0
}

/// Registers the lifecycle and agent-lifecycle callbacks on `conn` (for
/// every domain) and returns their ids for [`deregister`]. A failure is
/// logged: waits then fall back to polling.
pub fn register(conn: &Connect) -> Vec<c_int> {
    let mut ids = Vec::new();
    type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
    type WithTwoInts = unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        c_int,
        c_int,
        *mut c_void,
    ) -> c_int;
    for (id, what) in [
        (sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE, "lifecycle"),
        (sys::VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, "guest agent"),
    ] {
        // SAFETY: libvirt calls the callback with the signature of event `id`
        // (virConnectDomainEventCallback / ...AgentLifecycleCallback, both
        // (conn, dom, int, int, opaque)); the generic type is only how the
        // API takes it, as in libvirt's own VIR_DOMAIN_EVENT_CALLBACK macro.
        let callback =
            unsafe { std::mem::transmute::<WithTwoInts, Generic>(on_domain_event as WithTwoInts) };
        // SAFETY: `conn` is a live connection; no opaque data, nothing to free.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                id as c_int,
                Some(callback),
                std::ptr::null_mut(),
                None,
            )
        };
        if id < 0 {
            tracing::warn!(
                "libvirt {what} events could not be registered: waits poll instead ({})",
                virt::error::Error::last_error().message()
            );
        } else {
            ids.push(id);
        }
    }
    ids
}

/// Removes the callbacks [`register`] put on `conn`. Each holds a reference
/// on its connection, so a connection replaced after libvirtd went away is
/// only freed once they are gone. On a dead connection libvirt still drops
/// them locally and only fails to tell the daemon, which is ignored.
pub fn deregister(conn: &Connect, ids: &[c_int]) {
    for &id in ids {
        // SAFETY: `conn` is a live connection object (it may have lost its
        // daemon) and `id` came from registering on it.
        let _ = unsafe { sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_ends_at_the_next_event_of_its_domain() {
        let seen = count("agentvm-events-test");
        let waiter = std::thread::spawn(move || {
            wait_after(
                "agentvm-events-test",
                seen,
                Instant::now() + Duration::from_secs(10),
            )
        });
        std::thread::sleep(Duration::from_millis(20));
        bump("agentvm-events-other");
        bump("agentvm-events-test");
        assert!(waiter.join().unwrap());
        assert_eq!(count("agentvm-events-test"), seen + 1);
    }

    #[test]
    fn a_wait_without_events_ends_at_its_deadline() {
        let seen = count("agentvm-events-quiet");
        let start = Instant::now();
        assert!(!wait_after(
            "agentvm-events-quiet",
            seen,
            start + Duration::from_millis(30)
        ));
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn wait_for_checks_again_after_an_event() {
        let domain = "agentvm-events-ready";
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let setter = {
            let flag = flag.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                bump(domain);
            })
        };
        let start = Instant::now();
        // A fallback far beyond the test: only the event can end the wait early.
        let got = wait_for(
            domain,
            start + Duration::from_secs(20),
            Duration::from_secs(10),
            || Ok::<_, ()>(flag.load(std::sync::atomic::Ordering::SeqCst).then_some(())),
        );
        setter.join().unwrap();
        assert_eq!(got, Ok(Some(())));
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
