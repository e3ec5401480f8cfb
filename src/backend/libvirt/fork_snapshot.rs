//! The snapshot a fork starts from: one live external snapshot of the
//! source, its memory to a file and its disk's top frozen as a read-only
//! layer under a new top, with how long the guest was paused for it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use virt::domain::{Domain, DomainState};
use virt::enumutil::Enum;
use virt::sys;

use super::lv;
use crate::backend::Result;

/// How often the guest's state is read while the snapshot runs.
const PAUSE_POLL: Duration = Duration::from_millis(20);

/// Takes the live external snapshot: memory to `memory`, the disk's top
/// frozen under a new top `new_top`.
pub(super) fn snapshot(
    dom: &Domain,
    source: &str,
    memory: &Path,
    new_top: &Path,
) -> Result<Snapshot> {
    let live_xml = dom
        .xml_desc(0)
        .map_err(lv)
        .context("reading the domain XML")?;
    // A NoCloud seed disk is read-only: it stays as it is.
    let seed = if live_xml.contains("<target dev='vdb'") {
        "<disk name='vdb' snapshot='no'/>"
    } else {
        ""
    };
    let xml = format!(
        "<domainsnapshot><name>agentvm-fork</name>\
         <memory snapshot='external' file='{}'/>\
         <disks><disk name='vda' snapshot='external' type='file'><driver type='qcow2'/>\
         <source file='{}'/></disk>{seed}</disks></domainsnapshot>",
        xml_attr(&memory.to_string_lossy()),
        xml_attr(&new_top.to_string_lossy()),
    );
    let began = Instant::now();
    let flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_LIVE
        | sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
        | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
    let done = AtomicBool::new(false);
    let (taken, paused) = std::thread::scope(|scope| {
        let watch = scope.spawn(|| paused_time(dom, &done));
        let taken = dom.create_snapshot_xml(&xml, flags);
        done.store(true, Ordering::Relaxed);
        (taken, watch.join().unwrap_or_default())
    });
    if let Err(e) = taken {
        remove_file(memory);
        remove_file(new_top);
        return Err(lv(e)
            .context(format!("{source}: taking the snapshot to fork from"))
            .into());
    }
    Ok(Snapshot {
        seconds: began.elapsed().as_secs_f64(),
        paused_seconds: paused.as_secs_f64(),
    })
}

/// How long a snapshot took, and for how long of it the guest was paused.
pub(super) struct Snapshot {
    pub(super) seconds: f64,
    pub(super) paused_seconds: f64,
}

/// How long `dom` is seen paused until `done` (polled, so to within
/// [`PAUSE_POLL`]).
fn paused_time(dom: &Domain, done: &AtomicBool) -> Duration {
    let mut paused = Duration::ZERO;
    let mut last = Instant::now();
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(PAUSE_POLL);
        let now = Instant::now();
        if let Ok((Enum::Known(DomainState::Paused), _)) = dom.state() {
            paused += now - last;
        }
        last = now;
    }
    paused
}

fn xml_attr(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('\'', "&apos;")
        .replace('<', "&lt;")
}

/// Removes `path`; a file already gone is no failure, any other is logged.
pub(super) fn remove_file(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", path.display());
    }
}
