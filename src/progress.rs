//! Progress of long work: steps of an operation and byte counts of copies.
//! The CLI shows them as a progress bar on a terminal and as lines otherwise.

use std::io::{IsTerminal, Write as _};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub trait Reporter: Sync {
    /// A named step of work on a VM finished or started (`"overlay created"`).
    fn step(&self, vm: &str, step: &str);
    /// `done` of `total` bytes of `label` are through.
    fn bytes(&self, label: &str, done: u64, total: u64);
    /// The byte copy named `label` is complete.
    fn bytes_done(&self, label: &str);
}

/// Reports nothing.
pub struct Silent;

impl Reporter for Silent {
    fn step(&self, _: &str, _: &str) {}
    fn bytes(&self, _: &str, _: u64, _: u64) {}
    fn bytes_done(&self, _: &str) {}
}

/// Steps as lines on stderr; byte copies as a bar when stderr is a terminal.
pub struct Console {
    bar: Mutex<Option<ProgressBar>>,
    tty: bool,
    quiet: bool,
}

impl Console {
    /// `quiet` drops step lines (for `--json`, where stdout carries the result).
    pub fn new(quiet: bool) -> Self {
        Self {
            bar: Mutex::new(None),
            tty: std::io::stderr().is_terminal(),
            quiet,
        }
    }
}

impl Reporter for Console {
    fn step(&self, vm: &str, step: &str) {
        if !self.quiet {
            // Best effort: a standard error nobody reads is no reason to stop.
            let _ = writeln!(std::io::stderr(), "{vm}: {step}");
        }
    }

    fn bytes(&self, label: &str, done: u64, total: u64) {
        if !self.tty {
            return;
        }
        let mut bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        let bar = bar.get_or_insert_with(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        bar.set_position(done);
    }

    fn bytes_done(&self, label: &str) {
        let bar = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        if !self.quiet {
            let _ = writeln!(std::io::stderr(), "{label}: done");
        }
    }
}
