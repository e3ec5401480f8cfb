//! `cp` over SSH: the system `ssh` with `agentvm ssh`'s options, file bytes
//! streamed through its stdin/stdout, trees as tar archives.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};

use super::shell::{self, Entry};
use super::{Guest, Progress, host};
use crate::ssh::Endpoint;

/// How much one read or write moves.
const BUFFER: usize = 256 * 1024;

pub struct SshGuest {
    endpoint: Endpoint,
}

impl SshGuest {
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint }
    }

    /// `ssh` running `script` with `args`; stderr is piped.
    fn command(&self, script: &str, args: &[&str]) -> Command {
        let mut cmd = self.endpoint.command(&[shell::command_line(script, args)]);
        cmd.stderr(Stdio::piped());
        cmd
    }

    /// Runs `script` feeding its stdin from `feed`.
    fn run_feeding(
        &self,
        script: &str,
        args: &[&str],
        feed: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<()> {
        let mut child = self
            .command(script, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("running ssh (is openssh-client installed?)")?;
        let errors = drain_stderr(&mut child);
        let mut stdin = child.stdin.take().context("ssh has no stdin")?;
        let fed = feed(&mut stdin);
        drop(stdin);
        finish(child, errors, fed)
    }

    /// Runs `script` handing its stdout to `take`.
    fn run_reading(
        &self,
        script: &str,
        args: &[&str],
        take: impl FnOnce(&mut dyn Read) -> std::io::Result<()>,
    ) -> Result<()> {
        let mut child = self
            .command(script, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("running ssh (is openssh-client installed?)")?;
        let errors = drain_stderr(&mut child);
        let mut stdout = child.stdout.take().context("ssh has no stdout")?;
        let taken = take(&mut stdout);
        drop(stdout);
        finish(child, errors, taken)
    }
}

/// Collects a child's stderr on a thread, so a chatty child never blocks.
fn drain_stderr(child: &mut Child) -> Option<JoinHandle<String>> {
    let mut stderr = child.stderr.take()?;
    Some(std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    }))
}

/// Waits for `child`; its failure (with its stderr) comes first, then the
/// host side's own I/O error.
fn finish(
    mut child: Child,
    errors: Option<JoinHandle<String>>,
    io: std::io::Result<()>,
) -> Result<()> {
    let status = child.wait().context("waiting for ssh")?;
    let stderr = errors
        .and_then(|h| h.join().ok())
        .unwrap_or_default()
        .trim()
        .to_string();
    if !status.success() {
        let code = status
            .code()
            .map_or("a signal".to_string(), |c| c.to_string());
        if code == "255" {
            bail!("ssh failed (exit 255): {stderr}");
        }
        bail!("over SSH, the guest said (exit {code}): {stderr}");
    }
    io.context("copying through ssh")
}

/// Copies `from` to `to`, counting the bytes into `progress`.
fn pump(from: &mut dyn Read, to: &mut dyn Write, progress: &mut Progress) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return to.flush(),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        progress.add(n as u64);
    }
}

/// The host's `tar` with `args`, its stdin or stdout piped.
fn host_tar(args: &[&str], dir: &Path, stdin: bool) -> Result<Child> {
    let mut cmd = Command::new("tar");
    cmd.arg("-C").arg(dir).args(args);
    if stdin {
        cmd.stdin(Stdio::piped()).stdout(Stdio::null());
    } else {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    }
    cmd.stderr(Stdio::piped())
        .spawn()
        .context("running the host's tar")
}

fn wait_tar(mut tar: Child) -> Result<()> {
    let mut err = String::new();
    if let Some(mut stderr) = tar.stderr.take() {
        let _ = stderr.read_to_string(&mut err);
    }
    let status = tar.wait().context("waiting for the host's tar")?;
    if !status.success() {
        bail!("the host's tar failed: {}", err.trim());
    }
    Ok(())
}

impl Guest for SshGuest {
    fn via(&self) -> &'static str {
        "ssh"
    }

    fn sh(&self, script: &str, args: &[&str]) -> Result<String> {
        let out = self
            .command(script, args)
            .stdin(Stdio::null())
            .output()
            .context("running ssh (is openssh-client installed?)")?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        match out.status.code() {
            Some(0) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            Some(255) => bail!("ssh failed (exit 255): {stderr}"),
            Some(code) => bail!("over SSH, the guest said (exit {code}): {stderr}"),
            None => bail!("ssh was killed by a signal: {stderr}"),
        }
    }

    fn send_file(
        &self,
        src: &Path,
        mode: u32,
        temp: &str,
        target: &str,
        progress: &mut Progress,
    ) -> Result<()> {
        let mut file = File::open(src).with_context(|| format!("opening {}", src.display()))?;
        self.run_feeding(
            shell::RECEIVE_FILE,
            &[temp, &format!("{mode:o}"), target],
            |stdin| pump(&mut file, stdin, progress),
        )
    }

    fn receive_file(&self, path: &str, out: &mut File, progress: &mut Progress) -> Result<()> {
        self.run_reading(r#"exec cat -- "$1""#, &[path], |stdout| {
            pump(stdout, out, progress)
        })
    }

    fn send_tree(
        &self,
        dir: &Path,
        _tree: &host::Tree,
        name: &str,
        temp: &str,
        target: &str,
        progress: &mut Progress,
    ) -> Result<()> {
        let mut tar = host_tar(&["-cf", "-", "--", name], dir, false)?;
        let mut archive = tar.stdout.take().context("tar has no stdout")?;
        let sent = self.run_feeding(shell::RECEIVE_TREE, &[temp, name, target], |stdin| {
            pump(&mut archive, stdin, progress)
        });
        drop(archive);
        let packed = wait_tar(tar);
        sent.and(packed)
    }

    fn receive_tree(
        &self,
        dir: &str,
        name: &str,
        _entries: &[Entry],
        into: &Path,
        progress: &mut Progress,
    ) -> Result<()> {
        let mut tar = host_tar(&["--no-same-owner", "-xpf", "-"], into, true)?;
        let mut archive = tar.stdin.take().context("tar has no stdin")?;
        let received = self.run_reading(shell::SEND_TREE, &[dir, name], |stdout| {
            pump(stdout, &mut archive, progress)
        });
        drop(archive);
        let unpacked = wait_tar(tar);
        received.and(unpacked)
    }
}
