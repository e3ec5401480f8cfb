//! What the fake's guests hold: a small in-memory file system, the addresses their agent
//! reports, processes started through `agent/exec` (run on this host), and agent hangs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// QGA keeps at most this much of a process's stdout and of its stderr (QGA_EXEC_MAX_OUTPUT).
pub(super) const EXEC_MAX_OUTPUT: usize = 16 << 20;

/// A guest's files (path → bytes) and folders.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct GuestFs {
    pub(super) files: BTreeMap<String, Vec<u8>>,
    pub(super) dirs: BTreeSet<String>,
}

/// One guest: its file system, agent-reported addresses, processes and hang.
#[derive(Debug, Default)]
pub(super) struct Guest {
    pub(super) fs: GuestFs,
    /// Addresses on eth0 (`None`: [`super::model::FakeOptions::guest_ip`]).
    pub(super) ips: Option<Vec<String>>,
    /// Every agent command waits this long and then times out.
    pub(super) hang: Option<Duration>,
    pub(super) next_pid: i64,
    /// Processes started by `agent/exec` that QGA has not yet reported as exited.
    pub(super) execs: BTreeMap<i64, Arc<Mutex<Option<ExecDone>>>>,
    /// The file system as it was when each snapshot was taken.
    pub(super) snapshots: BTreeMap<String, GuestFs>,
}

/// How a process started by `agent/exec` ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ExecDone {
    pub(super) exitcode: Option<i32>,
    pub(super) signal: Option<i32>,
    pub(super) out: Vec<u8>,
    pub(super) err: Vec<u8>,
    pub(super) out_truncated: bool,
    pub(super) err_truncated: bool,
}

impl Guest {
    /// A new guest of VM `vmid` named `name`: `/etc`, `/etc/ssh`, `/etc/agentvm` and an ed25519
    /// host key unique to the VMID.
    pub(super) fn new(vmid: u32, name: &str) -> Guest {
        let mut fs = GuestFs::default();
        for dir in ["/", "/etc", "/etc/ssh", "/etc/agentvm", "/tmp", "/root"] {
            fs.dirs.insert(dir.to_string());
        }
        fs.files.insert(
            "/etc/ssh/ssh_host_ed25519_key.pub".to_string(),
            format!("{}\n", host_key_line(vmid, name)).into_bytes(),
        );
        Guest {
            fs,
            next_pid: 1000 + i64::from(vmid % 1000) * 10,
            ..Guest::default()
        }
    }

    /// Starts `argv` on this host (stdin = `input`), QGA's guest-exec; the pid it reports.
    pub(super) fn spawn(&mut self, argv: &[String], input: Option<Vec<u8>>) -> Result<i64, String> {
        let (program, args) = argv.split_first().ok_or("no command given")?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                // GLib's g_spawn message, as QGA passes it on.
                let why = match e.kind() {
                    std::io::ErrorKind::NotFound => "No such file or directory".to_string(),
                    std::io::ErrorKind::PermissionDenied => "Permission denied".to_string(),
                    _ => e.to_string(),
                };
                format!("Failed to execute child process \u{201c}{program}\u{201d} ({why})")
            })?;
        self.next_pid += 1;
        let pid = self.next_pid;
        let slot = Arc::new(Mutex::new(None));
        self.execs.insert(pid, slot.clone());
        let mut stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        std::thread::spawn(move || {
            if let (Some(mut pipe), Some(data)) = (stdin.take(), input) {
                std::thread::spawn(move || {
                    let _ = pipe.write_all(&data);
                });
            }
            let err_reader = std::thread::spawn(move || capture(&mut stderr));
            let (out, out_truncated) = capture(&mut stdout);
            let (err, err_truncated) = err_reader.join().unwrap_or_default();
            let status = child.wait();
            let (exitcode, signal) = match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    (s.code(), s.signal())
                }
                Err(_) => (None, None),
            };
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(ExecDone {
                exitcode,
                signal,
                out,
                err,
                out_truncated,
                err_truncated,
            });
        });
        Ok(pid)
    }
}

impl GuestFs {
    /// The folder holding `path` (`/` for `/x`).
    pub(super) fn parent(path: &str) -> String {
        match path.rsplit_once('/') {
            Some(("", _)) | None => "/".to_string(),
            Some((dir, _)) => dir.to_string(),
        }
    }

    /// Adds `dir` and the folders above it.
    pub(super) fn mkdir_p(&mut self, dir: &str) {
        let mut at = String::new();
        self.dirs.insert("/".to_string());
        for part in dir.split('/').filter(|p| !p.is_empty()) {
            at.push('/');
            at.push_str(part);
            self.dirs.insert(at.clone());
        }
    }

    /// Removes `dir` with everything below it.
    pub(super) fn remove_dir(&mut self, dir: &str) {
        let dir = dir.trim_end_matches('/');
        let below = format!("{dir}/");
        self.dirs.retain(|d| d != dir && !d.starts_with(&below));
        self.files.retain(|f, _| !f.starts_with(&below));
    }
}

/// Reads a pipe to its end, keeping the first [`EXEC_MAX_OUTPUT`] bytes.
fn capture(pipe: &mut impl Read) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = [0u8; 65536];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = EXEC_MAX_OUTPUT - kept.len();
                if n > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, truncated)
}

/// `ssh-ed25519 AAAA… root@NAME`: a well-formed public key whose 32 bytes derive from the VMID.
pub fn host_key_line(vmid: u32, name: &str) -> String {
    let point = Sha256::digest(format!("fake-pve host key of VM {vmid}").as_bytes());
    let mut blob = Vec::new();
    for part in [b"ssh-ed25519".as_slice(), point.as_slice()] {
        blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
        blob.extend_from_slice(part);
    }
    format!("ssh-ed25519 {} root@{name}", base64_encode(&blob))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (as MIME::Base64 and GLib write it, without line breaks).
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Strict base64 (QEMU's qbase64_decode): only the alphabet, `=` padding at the end.
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let invalid = || "Base64 data contains invalid characters".to_string();
    let bytes = text.as_bytes();
    let unpadded = text.trim_end_matches('=');
    if !bytes.len().is_multiple_of(4) || bytes.len() - unpadded.len() > 2 {
        return Err(invalid());
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in unpadded.bytes() {
        let v = B64.iter().position(|&b| b == c).ok_or_else(invalid)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// Bytes as Perl's JSON encoder shows a byte string: each byte one character (Latin-1), so
/// non-ASCII UTF-8 comes out double-encoded, as PVE sends decoded agent data.
pub fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}
