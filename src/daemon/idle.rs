//! When a daemon started on demand may go away: after a while with no client
//! connected (none waiting for an answer, none following events) and no
//! operation in flight. The next command starts a new daemon.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::paths::ENV_DAEMON_IDLE_EXIT;

/// How long a daemon started on demand stays without work before it exits.
pub const DEFAULT_IDLE_EXIT: &str = "15m";
/// What turns idle exit off.
pub const IDLE_EXIT_OFF: &str = "off";

/// Parses `--idle-exit` / `AGENTVM_DAEMON_IDLE_EXIT`: `30s`, `15m`, `1h`, or
/// `0`/`off` for never (`None`).
pub fn parse_idle_exit(text: &str) -> Result<Option<Duration>> {
    let text = text.trim();
    if text == "0" || text.eq_ignore_ascii_case(IDLE_EXIT_OFF) {
        return Ok(None);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => bail!(
            "--idle-exit / {ENV_DAEMON_IDLE_EXIT} = {text:?}: expected a number with a unit s, m or h \
             (such as 15m or 30s), or 0 / off to never exit"
        ),
    };
    let number: u64 = number.parse().map_err(|_| {
        anyhow::anyhow!(
            "--idle-exit / {ENV_DAEMON_IDLE_EXIT} = {text:?}: {number:?} is not a whole number \
             (write it like 15m or 30s, or 0 / off to never exit)"
        )
    })?;
    Ok(match number {
        0 => None,
        n => Some(Duration::from_secs(n.saturating_mul(scale))),
    })
}

/// Counts what keeps the daemon busy and remembers when it last was.
pub struct Activity {
    busy: AtomicUsize,
    since: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            busy: AtomicUsize::new(0),
            since: Mutex::new(Instant::now()),
        }
    }
}

impl Activity {
    /// A connection opened or an operation began; pair with [`Activity::leave`].
    pub fn enter(&self) {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.touch();
    }

    /// A connection closed or an operation ended.
    pub fn leave(&self) {
        self.touch();
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    fn touch(&self) {
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// How long the daemon has had nothing to do; `None` while it is busy.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.busy.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(
            self.since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed(),
        )
    }
}

/// Text for a duration in the units `--idle-exit` takes.
pub fn describe(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_exit_takes_units_and_off() {
        assert_eq!(
            parse_idle_exit("15m").unwrap(),
            Some(Duration::from_secs(900))
        );
        assert_eq!(parse_idle_exit("2s").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_idle_exit("1h").unwrap(),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(parse_idle_exit("0").unwrap(), None);
        assert_eq!(parse_idle_exit("off").unwrap(), None);
        assert_eq!(parse_idle_exit("0m").unwrap(), None);
        for bad in ["15", "m", "1.5m", "15 minutes", "-1m", ""] {
            let e = parse_idle_exit(bad).unwrap_err().to_string();
            assert!(e.contains(ENV_DAEMON_IDLE_EXIT), "{bad}: {e}");
        }
        assert_eq!(describe(Duration::from_secs(900)), "15m");
        assert_eq!(describe(Duration::from_secs(2)), "2s");
    }

    #[test]
    fn busy_until_the_last_one_leaves() {
        let activity = Activity::default();
        activity.enter();
        activity.enter();
        assert_eq!(activity.idle_for(), None);
        activity.leave();
        assert_eq!(activity.idle_for(), None);
        activity.leave();
        assert!(activity.idle_for().unwrap() < Duration::from_secs(1));
    }
}
