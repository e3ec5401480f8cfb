//! `agentvm cp [-r] SRC DST`: copies between the host and a VM, one side
//! written `VM:PATH`. Over SSH (the system client, with `agentvm ssh`'s
//! options) when the VM's SSH server answers, else through the guest agent's
//! file calls in chunks; the same guest scripts (`shell.rs`) on both paths.

mod agent;
mod host;
mod shell;
mod ssh;

use std::fs::File;
use std::net::ToSocketAddrs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};

use super::{App, guest, output};
use crate::progress::{Console, Reporter};
use shell::{Entry, Kind};

/// Which way `cp` reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// SSH when the VM's SSH server answers with its banner, else the agent.
    Auto,
    Ssh,
    Agent,
}

/// Copies below this size show no progress bar.
const PROGRESS_FROM: u64 = 1 << 20;

/// What both paths do in the guest.
trait Guest {
    fn via(&self) -> &'static str;
    /// Runs `script` under `sh -c` with `args` as `$1`…; its stdout, or an
    /// error with its stderr.
    fn sh(&self, script: &str, args: &[&str]) -> Result<String>;
    /// Copies the host file `src` to the guest's `temp`, sets `mode` and renames it to `target`.
    fn send_file(
        &self,
        src: &Path,
        mode: u32,
        temp: &str,
        target: &str,
        progress: &mut Progress,
    ) -> Result<()>;
    /// Writes the guest file `path` to `out`.
    fn receive_file(&self, path: &str, out: &mut File, progress: &mut Progress) -> Result<()>;
    /// Copies `tree` (whose root is `name` in the host folder `dir`) into the
    /// guest's folder `temp` (made here), then installs `temp/name` as `target`.
    fn send_tree(
        &self,
        dir: &Path,
        tree: &host::Tree,
        name: &str,
        temp: &str,
        target: &str,
        progress: &mut Progress,
    ) -> Result<()>;
    /// Copies the guest tree `dir/name` (listed as `entries`) into the host folder `into`.
    fn receive_tree(
        &self,
        dir: &str,
        name: &str,
        entries: &[Entry],
        into: &Path,
        progress: &mut Progress,
    ) -> Result<()>;
}

/// Byte progress of one copy, as a bar on a terminal's stderr.
pub(super) struct Progress {
    console: Option<Console>,
    label: String,
    done: u64,
    total: u64,
}

impl Progress {
    fn new(label: String, total: u64) -> Self {
        Self {
            console: (total >= PROGRESS_FROM).then(|| Console::new(true)),
            label,
            done: 0,
            total,
        }
    }

    fn add(&mut self, bytes: u64) {
        self.done += bytes;
        if let Some(console) = &self.console {
            console.bytes(&self.label, self.done, self.total.max(self.done));
        }
    }

    fn finish(&self) {
        if let Some(console) = &self.console {
            console.bytes_done(&self.label);
        }
    }
}

/// One side of a copy.
#[derive(Debug, PartialEq, Eq)]
enum Side {
    Host(PathBuf),
    Guest { vm: String, path: String },
}

/// `VM:PATH` when a `:` comes before any `/` and after a name; a host path
/// otherwise (`./a:b` is the host file `a:b`).
fn side(arg: &str) -> Side {
    match arg.split_once(':') {
        Some((vm, path)) if !vm.is_empty() && !vm.contains('/') => Side::Guest {
            vm: vm.to_string(),
            path: path.to_string(),
        },
        _ => Side::Host(PathBuf::from(arg)),
    }
}

pub fn cp(app: &App, recursive: bool, via: Via, src: &str, dst: &str) -> Result<i32> {
    let (vm, to_guest, host_path, guest_path) = match (side(src), side(dst)) {
        (Side::Host(h), Side::Guest { vm, path }) => (vm, true, h, path),
        (Side::Guest { vm, path }, Side::Host(h)) => (vm, false, h, path),
        (Side::Guest { .. }, Side::Guest { .. }) => {
            bail!("cp copies between the host and one VM: only one of SRC and DST may be VM:PATH")
        }
        (Side::Host(_), Side::Host(_)) => {
            bail!("cp needs one side written VM:PATH (a host path with ':' is written ./a:b)")
        }
    };
    let guest = connect(app, &vm, via)?;
    let started = Instant::now();
    let (files, bytes) = if to_guest {
        to_the_guest(guest.as_ref(), &vm, &host_path, &guest_path, recursive)
    } else {
        from_the_guest(guest.as_ref(), &vm, &guest_path, &host_path, recursive)
    }
    .map_err(|e| disk_full(e, &vm, to_guest, &guest_path))?;
    let seconds = started.elapsed().as_secs_f64();
    let direction = if to_guest { "to-guest" } else { "from-guest" };
    errln!(
        "{vm}: {files} file(s), {bytes} bytes {direction} via {} in {seconds:.1} s ({:.1} MiB/s)",
        guest.via(),
        bytes as f64 / (1 << 20) as f64 / seconds.max(0.001)
    );
    if app.json {
        output::print_json(&serde_json::json!({
            "vm": vm,
            "direction": direction,
            "via": guest.via(),
            "files": files,
            "bytes": bytes,
            "seconds": seconds,
        }))?;
    }
    Ok(0)
}

/// The path `via` names, or for `auto` SSH when a TCP connection to the VM's
/// SSH endpoint gets an SSH banner, else the agent.
fn connect<'a>(app: &'a App, vm: &str, via: Via) -> Result<Box<dyn Guest + 'a>> {
    let agent = || Box::new(agent::AgentGuest::new(app, vm)) as Box<dyn Guest + 'a>;
    match via {
        Via::Agent => Ok(agent()),
        Via::Ssh => Ok(Box::new(ssh::SshGuest::new(guest::endpoint(app, vm)?))),
        Via::Auto => {
            let endpoint = match guest::endpoint(app, vm) {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    tracing::info!("{vm}: no SSH endpoint ({e:#}): copying through the agent");
                    return Ok(agent());
                }
            };
            let answers = (endpoint.host.as_str(), endpoint.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut addrs| addrs.next())
                .and_then(|addr| crate::ssh::read_banner(&addr))
                .is_some();
            Ok(if answers {
                Box::new(ssh::SshGuest::new(endpoint))
            } else {
                tracing::info!("{vm}: SSH does not answer: copying through the agent");
                agent()
            })
        }
    }
}

/// A guest's "No space left on device" said plainly, naming the path.
fn disk_full(e: anyhow::Error, vm: &str, to_guest: bool, path: &str) -> anyhow::Error {
    if to_guest && shell::says_disk_full(&format!("{e:#}")) {
        anyhow!(
            "{vm}: the guest's disk is full: {path} was not written (nothing was left under its name)"
        )
    } else {
        e
    }
}

/// What is at the guest's `path`: its absolute form, and the entry or `None`.
fn probe(guest: &dyn Guest, path: &str) -> Result<(String, Option<Entry>)> {
    let out = guest.sh(shell::PROBE, &[path])?;
    let mut lines = out.lines();
    let absolute = lines
        .next()
        .context("the guest's probe printed nothing")?
        .to_string();
    match lines.next() {
        Some("missing") => Ok((absolute, None)),
        Some(line) => Ok((
            absolute,
            Some(
                shell::parse_entry(line)
                    .with_context(|| format!("the guest's stat printed {line:?}"))?,
            ),
        )),
        None => bail!("the guest's probe printed no stat line"),
    }
}

fn to_the_guest(
    guest: &dyn Guest,
    vm: &str,
    src: &Path,
    dst: &str,
    recursive: bool,
) -> Result<(u64, u64)> {
    let meta = match std::fs::metadata(src) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{}: no such file or directory", src.display())
        }
        other => other.with_context(|| format!("reading {}", src.display()))?,
    };
    if meta.is_dir() && !recursive {
        bail!(
            "{} is a directory: use -r to copy directories",
            src.display()
        );
    }
    let name = std::path::absolute(src)
        .ok()
        .and_then(|p| {
            p.components()
                .rfind(|c| !matches!(c, std::path::Component::CurDir))
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
        })
        .filter(|n| n != "/" && n != "..")
        .with_context(|| {
            format!(
                "{}: cannot name the copy (give it a name in DST)",
                src.display()
            )
        })?;
    let (absolute, there) = probe(guest, dst)?;
    let target = match there {
        Some(Entry {
            kind: Kind::Dir, ..
        }) => shell::join(&absolute, &name),
        _ => absolute,
    };
    let temp = shell::temp_beside(&target);
    let label = format!("{vm}:{target}");
    if meta.is_dir() {
        let tree = host::walk(src, &name)?;
        let mut progress = Progress::new(label, tree.bytes());
        guest.send_tree(
            host::parent_of(src),
            &tree,
            &name,
            &temp,
            &target,
            &mut progress,
        )?;
        progress.finish();
        Ok((tree.files.len() as u64, tree.bytes()))
    } else {
        let mut progress = Progress::new(label, meta.len());
        let mode = meta.permissions().mode() & 0o7777;
        guest.send_file(src, mode, &temp, &target, &mut progress)?;
        progress.finish();
        Ok((1, progress.done))
    }
}

fn from_the_guest(
    guest: &dyn Guest,
    vm: &str,
    src: &str,
    dst: &Path,
    recursive: bool,
) -> Result<(u64, u64)> {
    let (absolute, there) = probe(guest, src)?;
    let Some(entry) = there else {
        bail!("{vm}:{src}: no such file or directory");
    };
    let (dir, name) = shell::split(&absolute);
    if name.is_empty() || name == ".." {
        bail!("{vm}:{src}: cannot name the copy (give it a name in DST)");
    }
    let target = if dst.is_dir() {
        dst.join(&name)
    } else {
        dst.to_path_buf()
    };
    let label = target.display().to_string();
    match entry.kind {
        Kind::Dir if !recursive => {
            bail!("{vm}:{src} is a directory: use -r to copy directories")
        }
        Kind::Dir => {
            let listing = guest.sh(shell::LIST_TREE, &[&absolute])?;
            let entries = listing
                .lines()
                .map(|l| shell::parse_entry(l).with_context(|| format!("the guest listed {l:?}")))
                .collect::<Result<Vec<_>>>()?;
            let files: Vec<&Entry> = entries.iter().filter(|e| e.kind == Kind::File).collect();
            let bytes = files.iter().map(|e| e.size).sum();
            let temp = tempfile::Builder::new()
                .prefix(".agentvm-cp-")
                .tempdir_in(host::parent_of(&target))
                .with_context(|| format!("making a temporary folder beside {label}"))?;
            let mut progress = Progress::new(label, bytes);
            guest.receive_tree(&dir, &name, &entries, temp.path(), &mut progress)?;
            host::install_tree(&temp.path().join(&name), &target)?;
            progress.finish();
            Ok((files.len() as u64, bytes))
        }
        Kind::File => {
            let mut progress = Progress::new(label, entry.size);
            host::write_file(&target, entry.mode, |out| {
                guest.receive_file(&absolute, out, &mut progress)
            })?;
            progress.finish();
            Ok((1, progress.done))
        }
        Kind::Symlink | Kind::Other => {
            bail!("{vm}:{src} is not a regular file or directory")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_are_vm_paths_only_with_a_name_before_the_colon() {
        assert_eq!(
            side("drago:/etc/hosts"),
            Side::Guest {
                vm: "drago".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(
            side("drago:"),
            Side::Guest {
                vm: "drago".into(),
                path: String::new()
            }
        );
        assert_eq!(side("./a:b"), Side::Host("./a:b".into()));
        assert_eq!(side("/x/a:b"), Side::Host("/x/a:b".into()));
        assert_eq!(side(":x"), Side::Host(":x".into()));
        assert_eq!(side("plain"), Side::Host("plain".into()));
    }

    #[test]
    fn a_full_disk_is_said_plainly_with_the_path() {
        let e = disk_full(
            anyhow!("cat: write error: No space left on device"),
            "drago",
            true,
            "/mnt/small/big",
        );
        let text = e.to_string();
        assert!(text.contains("the guest's disk is full"), "{text}");
        assert!(text.contains("/mnt/small/big"), "{text}");
        let other = disk_full(anyhow!("Permission denied"), "drago", true, "/x");
        assert_eq!(other.to_string(), "Permission denied");
    }
}
