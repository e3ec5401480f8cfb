//! `exec` on Proxmox: `agent/exec` + `agent/exec-status`. PVE's `agent/exec`
//! takes no environment, so the command runs under a small `sh` wrapper that
//! sets `PATH`, `HOME` and the VM's env (read literally from the delivered env
//! file, never evaluated) and then `exec`s it: its output, exit code and
//! signal are the command's own.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use serde_json::Value;

use super::{Found, ProxmoxBackend, pve};
use crate::backend::{EXEC_PATH, ExecOutcome, Result, Stream};
use crate::nocloud::GUEST_ENV_PATH;

/// The first wait between `exec-status` calls; it doubles up to [`STATUS_POLL_MAX`].
const STATUS_POLL_FIRST: Duration = Duration::from_millis(20);
const STATUS_POLL_MAX: Duration = Duration::from_millis(500);
/// The most `agent/exec`'s `input-data` takes.
pub const MAX_EXEC_INPUT: usize = 65536;

/// PVE passes strings to and from the agent one character per byte (it
/// base64-encodes and decodes them as Perl byte strings): stdin goes as one
/// character per byte, so any bytes arrive as they are.
fn bytes_as_chars(bytes: &[u8]) -> String {
    bytes.iter().map(|b| char::from(*b)).collect()
}

/// The output bytes of an `exec-status` string: one byte per character, as
/// PVE sends them. A character above U+00FF cannot be such a byte: then the
/// text is taken as decoded text and written as UTF-8.
fn chars_as_bytes(text: &str) -> Vec<u8> {
    if text.chars().all(|c| u32::from(c) <= 0xFF) {
        text.chars().map(|c| u32::from(c) as u8).collect()
    } else {
        text.as_bytes().to_vec()
    }
}

/// PVE booleans arrive as `1`/`0`, `true`/`false` or strings of them.
pub(super) fn truthy(value: &Value) -> bool {
    match value {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_i64() == Some(1),
        Value::String(s) => matches!(s.as_str(), "1" | "true"),
        _ => false,
    }
}

/// `sh -c WRAPPER agentvm-exec ARGV…`: the env file's lines exported as they
/// are, then the command in place of the shell.
fn wrapped(argv: &[String]) -> Vec<String> {
    wrapped_with(argv, GUEST_ENV_PATH)
}

fn wrapped_with(argv: &[String], env_file: &str) -> Vec<String> {
    let script = format!(
        "export {EXEC_PATH} HOME=/root; \
         if [ -r {env_file} ]; then \
         while IFS= read -r line || [ -n \"$line\" ]; do \
         case $line in [A-Za-z_]*=*) export \"$line\";; esac; \
         done < {env_file}; fi; \
         exec \"$@\""
    );
    let mut out = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        script,
        "agentvm-exec".into(),
    ];
    out.extend(argv.iter().cloned());
    out
}

impl ProxmoxBackend {
    pub(super) fn exec_in(
        &self,
        found: &Found,
        name: &str,
        argv: &[String],
        stdin: Option<&[u8]>,
        timeout: Duration,
        output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        if argv.is_empty() {
            return Err(anyhow!("exec needs a command: agentvm exec NAME -- CMD [ARG…]").into());
        }
        let mut params: Vec<(&str, String)> =
            wrapped(argv).into_iter().map(|a| ("command", a)).collect();
        if let Some(input) = stdin {
            if input.len() > MAX_EXEC_INPUT {
                return Err(anyhow!(
                    "{name}: stdin is {} bytes; Proxmox's agent/exec takes at most {MAX_EXEC_INPUT}",
                    input.len()
                )
                .into());
            }
            params.push(("input-data", bytes_as_chars(input)));
        }
        // Never sent twice: the command could run twice.
        let started = self
            .client
            .post_once(&Self::path_of(found, "/agent/exec"), &params)
            .map_err(|e| anyhow!("{name}: starting the command through the guest agent: {e}"))?;
        let pid = started["pid"]
            .as_u64()
            .ok_or_else(|| anyhow!("{name}: agent/exec answered {started} without a pid"))?;
        let deadline = Instant::now() + timeout;
        let mut backoff = crate::backoff::Backoff::new(STATUS_POLL_FIRST, STATUS_POLL_MAX);
        loop {
            let status = self
                .client
                .get(
                    &Self::path_of(found, "/agent/exec-status"),
                    &[("pid", pid.to_string())],
                )
                .map_err(pve)?;
            if truthy(&status["exited"]) {
                // PVE hands the output over, decoded, once the command has exited.
                for (key, stream) in [("out-data", Stream::Stdout), ("err-data", Stream::Stderr)] {
                    if let Some(text) = status[key].as_str()
                        && !text.is_empty()
                    {
                        output(stream, &chars_as_bytes(text));
                    }
                }
                for (key, what) in [("out-truncated", "stdout"), ("err-truncated", "stderr")] {
                    if truthy(&status[key]) {
                        output(
                            Stream::Stderr,
                            format!(
                                "agentvm: {name}: the guest agent cut the command's {what} short\n"
                            )
                            .as_bytes(),
                        );
                    }
                }
                return Ok(ExecOutcome {
                    exit_code: status["exitcode"].as_i64(),
                    signal: status["signal"].as_i64(),
                });
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "{name}: the command did not finish within {}s (it keeps running in the guest as pid {pid})",
                    timeout.as_secs()
                )
                .into());
            }
            backoff.sleep_until(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_strings_carry_bytes() {
        let bytes = "héllo ✓\n".as_bytes();
        assert_eq!(chars_as_bytes(&bytes_as_chars(bytes)), bytes);
        assert_eq!(chars_as_bytes("plain ✓"), "plain ✓".as_bytes());
    }

    #[test]
    fn the_wrapper_execs_the_command_with_the_env_taken_literally() {
        let argv = wrapped(&["printf".into(), "%s".into(), "a b".into()]);
        assert_eq!(&argv[..2], ["/bin/sh", "-c"]);
        assert_eq!(&argv[3..], ["agentvm-exec", "printf", "%s", "a b"]);
        let out = std::process::Command::new("sh")
            .args(&argv[1..])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b");

        // The env file's values are taken as they are: quotes, `$` and spaces.
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("env");
        std::fs::write(&env, "TOKEN=a 'b' \"c\" $HOME `x`\nnot a line\nLAST=1").unwrap();
        let argv = wrapped_with(
            &[
                "sh".into(),
                "-c".into(),
                "printf '%s|%s|%s' \"$TOKEN\" \"$LAST\" \"$HOME\"".into(),
            ],
            &env.display().to_string(),
        );
        let out = std::process::Command::new("sh")
            .args(&argv[1..])
            .env_remove("TOKEN")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "a 'b' \"c\" $HOME `x`|1|/root"
        );
    }
}
