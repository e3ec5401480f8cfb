//! `cp` through the guest agent: `ReadFile`/`WriteFile` in chunks of
//! [`FILE_CHUNK_BYTES`] (each request well under the daemon's limit), the
//! mode set with the last chunk, and the guest scripts run with `Exec`.

use std::fs::{File, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

use super::shell::{self, Entry, Kind};
use super::{Guest, Progress, host};
use crate::backend::Stream;
use crate::cli::{App, one};
use crate::protocol::{Event, FILE_CHUNK_BYTES, Op, Outcome};

/// How long one guest script may run.
const SCRIPT_TIMEOUT_SECS: u64 = 300;
/// How many paths one script gets at most.
const ARGS_PER_SCRIPT: usize = 256;

pub struct AgentGuest<'a> {
    app: &'a App,
    vm: String,
}

impl<'a> AgentGuest<'a> {
    pub fn new(app: &'a App, vm: &str) -> Self {
        Self {
            app,
            vm: vm.to_string(),
        }
    }

    /// Writes all of `from` to the guest file `path` (made or replaced),
    /// giving it `mode` with the last chunk. The file is made empty first and
    /// every chunk appended, so a backend whose one write is smaller than a
    /// chunk (Proxmox's `agent/file-write`: 46080 bytes) takes them too.
    fn write_chunks(
        &self,
        from: &mut dyn Read,
        path: &str,
        mode: u32,
        progress: &mut Progress,
    ) -> Result<()> {
        self.write_op(Op::WriteFile {
            path: path.to_string(),
            data: Vec::new(),
            mode: None,
            append: false,
        })?;
        let mut pending = read_chunk(from)?;
        loop {
            let next = if pending.len() == FILE_CHUNK_BYTES {
                read_chunk(from)?
            } else {
                Vec::new()
            };
            let last = next.is_empty();
            let len = pending.len() as u64;
            self.write_op(Op::WriteFile {
                path: path.to_string(),
                data: pending,
                mode: last.then_some(mode),
                append: true,
            })?;
            progress.add(len);
            if last {
                return Ok(());
            }
            pending = next;
        }
    }

    fn write_op(&self, op: Op) -> Result<()> {
        match self.app.call_one(&self.vm, op)? {
            Outcome::FileWritten { .. } => Ok(()),
            other => bail!("{}: unexpected answer {other:?}", self.vm),
        }
    }

    /// Reads all of the guest file `path` into `to`.
    fn read_chunks(&self, path: &str, to: &mut dyn Write, progress: &mut Progress) -> Result<()> {
        let mut offset = 0u64;
        loop {
            let op = Op::ReadFile {
                path: path.to_string(),
                offset,
                length: Some(FILE_CHUNK_BYTES as u64),
            };
            let data = match self.app.call_one(&self.vm, op)? {
                Outcome::FileRead { data } => data,
                other => bail!("{}: unexpected answer {other:?}", self.vm),
            };
            to.write_all(&data).context("writing the copy")?;
            offset += data.len() as u64;
            progress.add(data.len() as u64);
            if data.len() < FILE_CHUNK_BYTES {
                return Ok(());
            }
        }
    }

    /// Runs `script` once per batch of `args`, each batch after `fixed`.
    fn sh_batched(&self, script: &str, fixed: &[&str], args: &[String]) -> Result<()> {
        for batch in args.chunks(ARGS_PER_SCRIPT) {
            let mut all: Vec<&str> = fixed.to_vec();
            all.extend(batch.iter().map(String::as_str));
            self.sh(script, &all)?;
        }
        Ok(())
    }

    /// Removes a temporary copy after a failure; its own failure is only logged.
    fn clean_up(&self, temp: &str) {
        if let Err(e) = self.sh(shell::REMOVE, &[temp]) {
            tracing::warn!("{}: {temp} was not removed: {e:#}", self.vm);
        }
    }
}

/// Up to one chunk from `from` (fewer only at its end).
fn read_chunk(from: &mut dyn Read) -> Result<Vec<u8>> {
    let mut chunk = Vec::with_capacity(FILE_CHUNK_BYTES);
    from.take(FILE_CHUNK_BYTES as u64)
        .read_to_end(&mut chunk)
        .context("reading the file to copy")?;
    Ok(chunk)
}

impl Guest for AgentGuest<'_> {
    fn via(&self) -> &'static str {
        "agent"
    }

    fn sh(&self, script: &str, args: &[&str]) -> Result<String> {
        let mut argv = vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            script.to_string(),
            "sh".to_string(),
        ];
        argv.extend(args.iter().map(|a| a.to_string()));
        let op = Op::Exec {
            argv,
            stdin: None,
            timeout_secs: SCRIPT_TIMEOUT_SECS,
            stream: false,
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let results =
            self.app
                .call_with(std::slice::from_ref(&self.vm), op, false, &mut |event| {
                    if let Event::Output { stream, data, .. } = event {
                        match stream {
                            Stream::Stdout => out.extend_from_slice(&data),
                            Stream::Stderr => err.extend_from_slice(&data),
                        }
                    }
                })?;
        let outcome = match one(results, &self.vm)? {
            Outcome::Exec(outcome) => outcome,
            other => bail!("{}: unexpected answer {other:?}", self.vm),
        };
        if outcome.exit_code != Some(0) {
            return Err(anyhow!(
                "through the guest agent, the guest said ({}): {}",
                outcome
                    .exit_code
                    .map_or("no exit code".to_string(), |c| format!("exit {c}")),
                String::from_utf8_lossy(&err).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
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
        let sent = self
            .write_chunks(&mut file, temp, mode, progress)
            .and_then(|()| self.sh(shell::RENAME, &[temp, target]).map(drop));
        if sent.is_err() {
            self.clean_up(temp);
        }
        sent
    }

    fn receive_file(&self, path: &str, out: &mut File, progress: &mut Progress) -> Result<()> {
        self.read_chunks(path, out, progress)
    }

    fn send_tree(
        &self,
        dir: &Path,
        tree: &host::Tree,
        name: &str,
        temp: &str,
        target: &str,
        progress: &mut Progress,
    ) -> Result<()> {
        let guest_path = |rel: &Path| shell::join(temp, &rel.to_string_lossy());
        for link in &tree.links {
            errln!(
                "{}: skipped the symbolic link {} (the SSH path copies links)",
                self.vm,
                link.display()
            );
        }
        let sent = (|| {
            self.sh(shell::REMOVE, &[temp])?;
            let dirs: Vec<String> = tree.dirs.iter().map(|(d, _)| guest_path(d)).collect();
            self.sh_batched(shell::MAKE_DIRS, &[], &dirs)?;
            for (rel, mode, _) in &tree.files {
                let src = dir.join(rel);
                let mut file =
                    File::open(&src).with_context(|| format!("opening {}", src.display()))?;
                self.write_chunks(&mut file, &guest_path(rel), *mode, progress)?;
            }
            let modes: Vec<String> = tree
                .dirs
                .iter()
                .rev()
                .flat_map(|(d, mode)| [format!("{mode:o}"), guest_path(d)])
                .collect();
            self.sh_batched(shell::CHMOD_PAIRS, &[], &modes)?;
            self.sh(shell::INSTALL_TREE, &[temp, name, target])
                .map(drop)
        })();
        if sent.is_err() {
            self.clean_up(temp);
        }
        sent
    }

    fn receive_tree(
        &self,
        dir: &str,
        name: &str,
        entries: &[Entry],
        into: &Path,
        progress: &mut Progress,
    ) -> Result<()> {
        let prefix = shell::join(dir, "");
        let mut dirs = Vec::new();
        for entry in entries {
            let rel = entry
                .path
                .strip_prefix(&prefix)
                .filter(|rel| *rel == name || rel.starts_with(&format!("{name}/")))
                .with_context(|| format!("the guest listed {:?} outside the tree", entry.path))?;
            let host_path = into.join(rel);
            match entry.kind {
                Kind::Dir => {
                    std::fs::create_dir_all(&host_path)
                        .with_context(|| format!("making {}", host_path.display()))?;
                    dirs.push((host_path, entry.mode));
                }
                Kind::File => {
                    let mut file = File::create(&host_path)
                        .with_context(|| format!("making {}", host_path.display()))?;
                    self.read_chunks(&entry.path, &mut file, progress)?;
                    file.set_permissions(Permissions::from_mode(entry.mode))
                        .with_context(|| format!("setting the mode of {}", host_path.display()))?;
                }
                Kind::Symlink | Kind::Other => errln!(
                    "{}: skipped {} (not a regular file or folder; the SSH path copies links)",
                    self.vm,
                    entry.path
                ),
            }
        }
        for (path, mode) in dirs.iter().rev() {
            std::fs::set_permissions(path, Permissions::from_mode(*mode))
                .with_context(|| format!("setting the mode of {}", path.display()))?;
        }
        Ok(())
    }
}
