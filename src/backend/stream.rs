//! `exec --stream`: a command's output while it runs. The guest agent hands
//! over captured output only once a command has exited, so the command runs in
//! the background with its output going to files in a private guest folder,
//! and those files are read from where the last read stopped until its exit
//! status appears. Written once on the role traits, so it works wherever
//! `exec` and ranged file reads do (both backends).

use std::time::{Duration, Instant};

use anyhow::anyhow;
use sha2::{Digest, Sha256};

use super::{ExecOutcome, GuestAgent, Result, Stream, exec_captured};
use crate::backoff::Backoff;

/// Starts `$@` in the background in folder `$1` (made 0700): its output goes
/// to `out` and `err` there, and its exit status to `rc` once it ends.
const LAUNCH: &str = r#"d=$1; shift
mkdir -m 700 "$d" || exit 125
( "$@" </dev/null >"$d/out" 2>"$d/err"; echo $? >"$d/rc.tmp"; mv "$d/rc.tmp" "$d/rc" ) >/dev/null 2>&1 &"#;
/// The most read from one output file per call.
const READ_CHUNK: usize = 64 * 1024;
const POLL_FIRST: Duration = Duration::from_millis(5);
const POLL_MAX: Duration = Duration::from_millis(100);

/// Runs `argv` in the guest, passing its output to `output` as it is written.
pub fn exec_streaming(
    backend: &(impl GuestAgent + ?Sized),
    name: &str,
    argv: &[String],
    timeout: Duration,
    output: &mut dyn FnMut(Stream, &[u8]),
) -> Result<ExecOutcome> {
    if argv.is_empty() {
        return Err(anyhow!("exec needs a command: agentvm exec NAME -- CMD [ARG…]").into());
    }
    let dir = format!("/tmp/agentvm-stream-{}", unique());
    let mut launch = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        LAUNCH.to_string(),
        "sh".to_string(),
        dir.clone(),
    ];
    launch.extend_from_slice(argv);
    let started = exec_captured(backend, name, &launch, Duration::from_secs(30))?;
    if !started.succeeded() {
        return Err(anyhow!(
            "{name}: could not start the command in the background: {}",
            started.stderr_text()
        )
        .into());
    }
    let deadline = Instant::now() + timeout;
    let (mut out_at, mut err_at) = (0u64, 0u64);
    let mut backoff = Backoff::new(POLL_FIRST, POLL_MAX);
    loop {
        // The status first: output written before it is then read in full below.
        let rc = backend
            .read_file_range(name, &format!("{dir}/rc"), 0, 16)
            .ok();
        let mut got = drain(
            backend,
            name,
            &format!("{dir}/out"),
            &mut out_at,
            Stream::Stdout,
            output,
        );
        got |= drain(
            backend,
            name,
            &format!("{dir}/err"),
            &mut err_at,
            Stream::Stderr,
            output,
        );
        if let Some(rc) = rc {
            cleanup(backend, name, &dir);
            let code = String::from_utf8_lossy(&rc).trim().parse::<i64>().ok();
            return Ok(ExecOutcome {
                exit_code: code,
                signal: None,
            });
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "{name}: the command did not finish within {}s (it keeps running in the guest; its output is in {dir})",
                timeout.as_secs()
            )
            .into());
        }
        if got {
            backoff = Backoff::new(POLL_FIRST, POLL_MAX);
        }
        backoff.sleep_until(deadline);
    }
}

/// Passes on what `path` holds past `at`; true when there was something.
fn drain(
    backend: &(impl GuestAgent + ?Sized),
    name: &str,
    path: &str,
    at: &mut u64,
    stream: Stream,
    output: &mut dyn FnMut(Stream, &[u8]),
) -> bool {
    let mut any = false;
    // A file not made yet, or a read that failed, is tried again next time.
    while let Ok(data) = backend.read_file_range(name, path, *at, READ_CHUNK) {
        if data.is_empty() {
            break;
        }
        *at += data.len() as u64;
        output(stream, &data);
        any = true;
        if data.len() < READ_CHUNK {
            break;
        }
    }
    any
}

fn cleanup(backend: &(impl GuestAgent + ?Sized), name: &str, dir: &str) {
    let argv = ["rm".to_string(), "-rf".to_string(), dir.to_string()];
    if let Err(e) = backend.exec(name, &argv, None, Duration::from_secs(30), &mut |_, _| {}) {
        tracing::warn!("{name}: removing {dir}: {e}");
    }
}

/// A name no other stream of this host uses.
fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let digest = Sha256::digest(format!("{nanos}-{}", std::process::id()));
    hex::encode(&digest[..8])
}
