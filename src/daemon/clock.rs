//! Guest clocks after the host sleeps. A suspended host stops its VMs with it,
//! and on wake their clocks lag by the time asleep, which breaks TLS and build
//! timestamps in the guest. The daemon notices a suspend as `CLOCK_BOOTTIME`
//! (which counts sleep) running ahead of `CLOCK_MONOTONIC` (which does not),
//! and then sets the clock of every running local VM that has a guest agent.

use std::sync::Arc;
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

use super::Shared;
use crate::backend::State;

/// How often the daemon compares the two clocks.
const CHECK: Duration = Duration::from_secs(5);
/// Sleep shorter than this is not worth a resync (and may be scheduling noise).
const MIN_SLEEP: Duration = Duration::from_secs(3);

fn now(clock: ClockId) -> Duration {
    clock_gettime(clock).map_or(Duration::ZERO, Duration::from)
}

/// How long the host slept since the last call (boot time gained over monotonic time).
struct SleepMeter {
    boot: Duration,
    mono: Duration,
}

impl SleepMeter {
    fn new() -> Self {
        Self {
            boot: now(ClockId::CLOCK_BOOTTIME),
            mono: now(ClockId::CLOCK_MONOTONIC),
        }
    }

    fn slept(&mut self) -> Duration {
        let (boot, mono) = (now(ClockId::CLOCK_BOOTTIME), now(ClockId::CLOCK_MONOTONIC));
        let slept = (boot.saturating_sub(self.boot)).saturating_sub(mono.saturating_sub(self.mono));
        self.boot = boot;
        self.mono = mono;
        slept
    }
}

/// Watches for host sleep for as long as the daemon runs.
pub async fn watch(shared: Arc<Shared>) {
    let mut meter = SleepMeter::new();
    loop {
        tokio::time::sleep(CHECK).await;
        let slept = meter.slept();
        if slept < MIN_SLEEP {
            continue;
        }
        tracing::info!(
            "the host slept for {:.0} s: setting the clocks of running VMs",
            slept.as_secs_f64()
        );
        let local = shared.registry.local().clone();
        let synced = tokio::task::spawn_blocking(move || resync_all(local.as_ref())).await;
        if let Err(e) = synced {
            tracing::warn!("setting guest clocks after sleep failed: {e}");
        }
    }
}

/// Sets the clock of every running local VM with an agent; says what it did.
fn resync_all(backend: &dyn crate::backend::Backend) {
    let states = match backend.states() {
        Ok(states) => states,
        Err(e) => {
            tracing::warn!("after sleep: listing VMs: {e}");
            return;
        }
    };
    for (name, state) in states {
        if state != State::Running || !backend.agent_expected(&name).unwrap_or(false) {
            continue;
        }
        match backend.sync_clock(&name) {
            Ok(drift) => tracing::info!(
                "{name}: clock set after sleep (it was {:+.1} s off)",
                drift as f64 / 1000.0
            ),
            Err(e) => tracing::warn!("{name}: clock not set after sleep: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_sleep_is_measured_while_awake() {
        let mut meter = SleepMeter::new();
        std::thread::sleep(Duration::from_millis(50));
        assert!(meter.slept() < Duration::from_millis(20));
        // A meter whose last reading is an hour of boot time behind sees an hour
        // asleep (less on a machine up for under an hour: what boot time it has).
        let gap = meter.boot.min(Duration::from_secs(3600));
        assert!(
            gap > Duration::from_secs(2),
            "the machine booted {gap:?} ago"
        );
        meter.boot -= gap;
        let slept = meter.slept();
        assert!(
            slept >= gap - Duration::from_secs(1),
            "{slept:?} of {gap:?}"
        );
    }
}
