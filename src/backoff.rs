//! Waiting on something that sends no event: sleeps that start short (so a
//! quick answer is seen at once) and grow to a cap (so a long wait costs
//! little), never one fixed interval.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { next: first, max }
    }

    /// The next sleep, and grows the one after it (doubling, up to the cap).
    pub fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    /// Sleeps the next step, but not past `deadline`.
    pub fn sleep_until(&mut self, deadline: Instant) {
        let step = self.step();
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(step.min(left));
    }

    /// Sleeps the next step.
    pub fn sleep(&mut self) {
        std::thread::sleep(self.step());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_millis(10));
        let steps: Vec<u64> = (0..6).map(|_| b.step().as_millis() as u64).collect();
        assert_eq!(steps, [1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn a_sleep_stops_at_the_deadline() {
        let mut b = Backoff::new(Duration::from_secs(5), Duration::from_secs(5));
        let start = Instant::now();
        b.sleep_until(start + Duration::from_millis(20));
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
