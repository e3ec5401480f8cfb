//! The guest agent endpoints of the fake PVE (`/nodes/{node}/qemu/{vmid}/agent/…`), as
//! qemu-server's API2/Qemu/Agent.pm and QemuServer/Agent.pm serve them on top of QGA.

use serde_json::{Value, json};

use super::guest::{ExecDone, GuestFs, base64_decode, base64_encode, latin1};
use super::qemu::mac_for;
use super::state::{Caller, Fail, Params, State, fail};
use super::syntax::parse_bool;

/// qemu-server's limit for `agent/file-read` (and its default `count`).
const MAX_READ_SIZE: usize = 16 << 20;
/// qemu-server reads a file in chunks of this size.
const READ_CHUNK: usize = 1 << 20;

impl State {
    /// `agent/ping` and `agent/network-get-interfaces` (any agent command PVE passes on as is).
    pub(super) fn agent(
        &mut self,
        caller: &Caller,
        vmid: u32,
        command: &str,
    ) -> Result<Value, Fail> {
        caller.require_any(
            &format!("/vms/{vmid}"),
            &["VM.GuestAgent.Audit", "VM.GuestAgent.Unrestricted"],
        )?;
        self.agent_answers(vmid, command)?;
        Ok(match command {
            "ping" => json!({ "result": {} }),
            _ => json!({ "result": self.interfaces(vmid) }),
        })
    }

    /// QGA's guest-network-get-interfaces: loopback, then eth0 with the guest's addresses and an
    /// IPv6 link-local one.
    fn interfaces(&mut self, vmid: u32) -> Value {
        let default_ip = self.opts.guest_ip.clone();
        let ips = self.guest(vmid).ips.clone().unwrap_or(vec![default_ip]);
        let mut addrs: Vec<Value> = ips
            .iter()
            .map(|ip| {
                let (v6, prefix) = (ip.contains(':'), if ip.contains(':') { 64 } else { 24 });
                json!({
                    "ip-address": ip,
                    "ip-address-type": if v6 { "ipv6" } else { "ipv4" },
                    "prefix": prefix,
                })
            })
            .collect();
        addrs.push(json!({ "ip-address": "fe80::1", "ip-address-type": "ipv6", "prefix": 64 }));
        json!([
            { "name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": [
                { "ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8 },
                { "ip-address": "::1", "ip-address-type": "ipv6", "prefix": 128 },
            ]},
            { "name": "eth0", "hardware-address": mac_for(vmid).to_ascii_lowercase(),
              "ip-addresses": addrs },
        ])
    }

    /// What PVE checks before an agent command reaches the guest (assert_agent_available:
    /// configured, running, answering guest-ping; the first [`FakeOptions::agent_down_calls`]
    /// calls after a start find it not yet up), then a hung agent: the command (`guest-` +
    /// `command`) times out after the hang, without the state lock held meanwhile.
    ///
    /// [`FakeOptions::agent_down_calls`]: super::model::FakeOptions::agent_down_calls
    pub(super) fn agent_answers(&mut self, vmid: u32, command: &str) -> Result<(), Fail> {
        let vm = self.vm(vmid)?;
        if !vm.agent_enabled() {
            return fail(500, "No QEMU guest agent configured");
        }
        if !vm.running {
            return fail(500, format!("VM {vmid} is not running"));
        }
        let calls = self.agent_calls.entry(vmid).or_insert(0);
        *calls = calls.saturating_add(1);
        if *calls <= self.opts.agent_down_calls {
            return fail(500, "QEMU guest agent is not running");
        }
        if let Some(hang) = self.guest(vmid).hang {
            self.sleep = Some(hang);
            return fail(
                500,
                format!("VM {vmid} qga command 'guest-{command}' failed - got timeout"),
            );
        }
        Ok(())
    }

    /// `agent/shutdown`: the guest powers off once its agent answers.
    pub(super) fn agent_shutdown(&mut self, caller: &Caller, vmid: u32) -> Result<Value, Fail> {
        caller.require_any(
            &format!("/vms/{vmid}"),
            &["VM.PowerMgmt", "VM.GuestAgent.Unrestricted"],
        )?;
        self.agent_answers(vmid, "shutdown")?;
        if let Some(vm) = self.vms.get_mut(&vmid) {
            vm.running = false;
        }
        self.guest(vmid).execs.clear();
        Ok(json!({ "result": {} }))
    }

    /// `agent/exec`: `command` (an array: repeated form parameters or a JSON array) runs on this
    /// host, `input-data` on its stdin. Replies `{"pid": N}`.
    pub(super) fn agent_exec(
        &mut self,
        caller: &Caller,
        vmid: u32,
        p: &Params,
    ) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.GuestAgent.Unrestricted")?;
        self.vm(vmid)?;
        let argv: Vec<String> = p["command"].split('\0').map(str::to_string).collect();
        // qemu_exec passes input-data through encode_base64, which takes bytes only.
        let input = match p.get("input-data") {
            Some(text) => Some(perl_bytes(text, "QemuServer/Agent.pm line 139")?),
            None => None,
        };
        self.agent_answers(vmid, "exec")?;
        let pid = self
            .guest(vmid)
            .spawn(&argv, input)
            .map_err(|e| (500, format!("Agent error: {e}")))?;
        Ok(json!({ "pid": pid }))
    }

    /// `agent/exec-status`: `{"exited": 0}` while the process runs; once it has ended, its exit
    /// code or signal and output, decoded (QGA forgets the process after that answer).
    pub(super) fn agent_exec_status(
        &mut self,
        caller: &Caller,
        vmid: u32,
        p: &Params,
    ) -> Result<Value, Fail> {
        caller.require(&format!("/vms/{vmid}"), "VM.GuestAgent.Unrestricted")?;
        self.vm(vmid)?;
        self.agent_answers(vmid, "exec-status")?;
        let pid: i64 = p["pid"].parse().unwrap_or(-1);
        let guest = self.guest(vmid);
        let Some(slot) = guest.execs.get(&pid) else {
            return fail(500, "Agent error: Invalid parameter 'pid'");
        };
        let done = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(done) = done else {
            return Ok(json!({ "exited": 0 }));
        };
        guest.execs.remove(&pid);
        Ok(exec_status_json(&done))
    }

    /// `agent/file-read`: `{"content": …, "bytes-read": N}` plus `"truncated": 1` when the end
    /// of the file was not reached; `decode=0` gives the base64 QGA sent (one string per 1 MiB
    /// chunk, concatenated, as qemu-server does).
    pub(super) fn agent_file_read(
        &mut self,
        caller: &Caller,
        vmid: u32,
        p: &Params,
    ) -> Result<Value, Fail> {
        caller.require_any(
            &format!("/vms/{vmid}"),
            &["VM.GuestAgent.FileRead", "VM.GuestAgent.Unrestricted"],
        )?;
        self.vm(vmid)?;
        let count: usize = p
            .get("count")
            .and_then(|c| c.parse().ok())
            .unwrap_or(MAX_READ_SIZE);
        let offset: usize = p.get("offset").and_then(|c| c.parse().ok()).unwrap_or(0);
        let decode = p.get("decode").and_then(|d| parse_bool(d)).unwrap_or(true);
        self.agent_answers(vmid, "file-open")?;
        let path = guest_path(&p["file"]);
        let data = if self.opts.files_on_host {
            std::fs::read(&p["file"]).map_err(|e| {
                (
                    500,
                    format!(
                        "Agent error: failed to open file '{}' (mode: 'r'): {}",
                        p["file"],
                        io_why(&e)
                    ),
                )
            })?
        } else {
            let fs = &self.guest(vmid).fs;
            let Some(data) = fs.files.get(&path) else {
                if fs.dirs.contains(&path) {
                    return fail(500, "Agent error: failed to read file: Is a directory");
                }
                return fail(
                    500,
                    format!(
                        "Agent error: failed to open file '{}' (mode: 'r'): No such file or directory",
                        p["file"]
                    ),
                );
            };
            data.clone()
        };
        let mut at = offset.min(data.len());
        let (mut read, mut eof) = (0, false);
        let mut content = String::new();
        while read < count && !eof {
            let want = (count - read).min(READ_CHUNK);
            let got = want.min(data.len() - at);
            // fread reaches EOF when it asked for more than was left.
            eof = got < want;
            let chunk = &data[at..at + got];
            if decode {
                content.push_str(&latin1(chunk));
            } else {
                content.push_str(&base64_encode(chunk));
            }
            at += got;
            read += got;
        }
        let mut r = json!({ "content": content, "bytes-read": read });
        if !eof {
            r["truncated"] = json!(1);
        }
        Ok(r)
    }

    /// `agent/file-write`: `encode=1` (the default) takes `content` as text and base64-encodes
    /// it for QGA (characters above U+00FF fail, as in Perl's encode_base64; others become one
    /// byte each); `encode=0` passes `content` on as base64, which QGA decodes strictly. The
    /// folder must exist; the file is created or truncated before the data is written.
    pub(super) fn agent_file_write(
        &mut self,
        caller: &Caller,
        vmid: u32,
        p: &Params,
    ) -> Result<Value, Fail> {
        caller.require_any(
            &format!("/vms/{vmid}"),
            &["VM.GuestAgent.FileWrite", "VM.GuestAgent.Unrestricted"],
        )?;
        self.vm(vmid)?;
        let encode = p.get("encode").and_then(|d| parse_bool(d)).unwrap_or(true);
        let data = if encode {
            Some(perl_bytes(&p["content"], "API2/Qemu/Agent.pm line 455")?)
        } else {
            None
        };
        self.agent_answers(vmid, "file-open")?;
        if self.opts.files_on_host {
            let data = match data {
                Some(d) => d,
                None => {
                    base64_decode(&p["content"]).map_err(|e| (500, format!("Agent error: {e}")))?
                }
            };
            std::fs::write(&p["file"], data).map_err(|e| {
                (
                    500,
                    format!(
                        "Agent error: failed to open file '{}' (mode: 'wb'): {}",
                        p["file"],
                        io_why(&e)
                    ),
                )
            })?;
            return Ok(Value::Null);
        }
        let path = guest_path(&p["file"]);
        let fs = &mut self.guest(vmid).fs;
        let open_error = |why: &str| {
            fail(
                500,
                format!(
                    "Agent error: failed to open file '{}' (mode: 'wb'): {why}",
                    p["file"]
                ),
            )
        };
        if fs.dirs.contains(&path) {
            return open_error("Is a directory");
        }
        if !fs.dirs.contains(&GuestFs::parent(&path)) {
            return open_error("No such file or directory");
        }
        fs.files.insert(path.clone(), Vec::new());
        let data = match data {
            Some(d) => d,
            None => base64_decode(&p["content"]).map_err(|e| (500, format!("Agent error: {e}")))?,
        };
        fs.files.insert(path, data);
        Ok(Value::Null)
    }
}

/// An exited process as qemu-server reports it: QGA's fields, booleans as 0/1, output decoded
/// from base64 (and shown byte per character, see [`latin1`]).
/// An I/O error as QGA words it (g_strerror: the text without Rust's "(os error N)").
fn io_why(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

fn exec_status_json(done: &ExecDone) -> Value {
    let mut r = json!({ "exited": 1 });
    if let Some(code) = done.exitcode {
        r["exitcode"] = json!(code);
    }
    if let Some(signal) = done.signal {
        r["signal"] = json!(signal);
    }
    // QEMU 10.1 sends *-truncated whenever it sends the data.
    if !done.out.is_empty() {
        r["out-data"] = json!(latin1(&done.out));
        r["out-truncated"] = json!(u8::from(done.out_truncated));
    }
    if !done.err.is_empty() {
        r["err-data"] = json!(latin1(&done.err));
        r["err-truncated"] = json!(u8::from(done.err_truncated));
    }
    r
}

/// A Perl character string as encode_base64 takes it: one byte per character up to U+00FF.
fn perl_bytes(text: &str, at: &str) -> Result<Vec<u8>, Fail> {
    text.chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| {
            (
                500,
                format!("Wide character in subroutine entry at /usr/share/perl5/PVE/{at}."),
            )
        })
}

/// A guest path as QGA opens it (relative paths from `/`, no trailing slash).
fn guest_path(file: &str) -> String {
    let path = if file.starts_with('/') {
        file.to_string()
    } else {
        format!("/{file}")
    };
    match path.trim_end_matches('/') {
        "" => "/".to_string(),
        p => p.to_string(),
    }
}
