//! The CLI's own writes to standard output and standard error.
//!
//! A reader that has gone away (`agentvm list | head -1`) or a full disk must
//! not panic the CLI, and must not stop a command halfway: `deploy` and
//! `retire` still record what they did. So a failed write to standard output
//! is remembered, later output is skipped, the command finishes, and its exit
//! code becomes 141 (what a shell shows for a C tool ended by SIGPIPE) for a
//! closed pipe, or 1 with a message for any other failure. Commands that only
//! print as they go (`events`, `console -f`) stop once nobody reads.
//! Standard error is best effort: a failed write there is ignored.

use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};

/// The exit code when standard output was closed under us (128 + SIGPIPE).
const CLOSED_EXIT: i32 = 141;

const OPEN: u8 = 0;
const CLOSED: u8 = 1;
const FAILED: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(OPEN);

/// Writes formatted output (what `outln!` and `out!` call).
pub fn write(args: std::fmt::Arguments) {
    if gone() {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    note(stdout.write_fmt(args).and_then(|()| stdout.flush()));
}

/// [`write`] for bytes made elsewhere (a completion script, a man page, a log).
pub fn write_bytes(bytes: &[u8]) {
    if gone() {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    note(stdout.write_all(bytes).and_then(|()| stdout.flush()));
}

/// Whether a write to standard output has failed (nobody reads any more).
pub fn gone() -> bool {
    STATE.load(Ordering::Relaxed) != OPEN
}

/// The exit code a command that ended with `code` gets: a failed write to
/// standard output turns success into 141 (closed pipe) or 1.
pub fn exit_code(code: i32) -> i32 {
    match STATE.load(Ordering::Relaxed) {
        CLOSED if code == 0 => CLOSED_EXIT,
        FAILED if code == 0 => 1,
        _ => code,
    }
}

/// Writes a line to standard error, ignoring failures (what `errln!` calls).
pub fn write_err(args: std::fmt::Arguments) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_fmt(args);
}

fn note(result: std::io::Result<()>) {
    let Err(e) = result else { return };
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        STATE.store(CLOSED, Ordering::Relaxed);
    } else if STATE.swap(FAILED, Ordering::Relaxed) == OPEN {
        write_err(format_args!(
            "agentvm: error: writing to standard output: {e}\n"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_changes_only_a_successful_exit_code() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(3), 3);
        STATE.store(CLOSED, Ordering::Relaxed);
        assert_eq!((exit_code(0), exit_code(3)), (141, 3));
        STATE.store(FAILED, Ordering::Relaxed);
        assert_eq!((exit_code(0), exit_code(3)), (1, 3));
        STATE.store(OPEN, Ordering::Relaxed);
    }
}
