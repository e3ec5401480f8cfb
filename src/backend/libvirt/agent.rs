//! The local backend's guest agent: readiness and addresses, shutdown, exec
//! and host keys, through typed QGA commands.

use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use qapi::qga;
use virt::domain::Domain;

use super::LocalBackend;
use crate::backend::{
    AgentState, BackendError, EXEC_PATH, ExecOutcome, GuestAgent, HostKey, Result, Stream,
};
use crate::backoff::Backoff;
use crate::domain::{LISTEN_ADDRESS, VmState};
use crate::fsutil::write_atomic;
use crate::guest::{Guest, GuestError};

/// How long one agent command may take before the agent counts as not responding.
const AGENT_TIMEOUT: Duration = Duration::from_secs(2);
/// How `exec` polls `guest-exec-status`: from 1 ms (a quick command is seen
/// done at once) growing to 50 ms (a long one costs the guest little).
const EXEC_POLL_FIRST: Duration = Duration::from_millis(1);
const EXEC_POLL_MAX: Duration = Duration::from_millis(50);
/// How `up` polls the guest agent between events: 5 ms growing to 200 ms
/// (the agent's port opening wakes the wait at once).
const AGENT_POLL_FIRST: Duration = Duration::from_millis(5);
const AGENT_POLL_MAX: Duration = Duration::from_millis(200);

impl LocalBackend {
    /// The agent's state and the guest's addresses (loopback and link-local
    /// left out), for a VM whose domain is `running` (as its state said a
    /// moment ago).
    pub(super) fn agent_info(
        &self,
        dom: &Domain,
        state: &VmState,
        running: bool,
    ) -> (AgentState, Vec<String>) {
        if !running {
            return (AgentState::Stopped, Vec::new());
        }
        if !state.agent {
            return (AgentState::Disabled, Vec::new());
        }
        match Guest::new(dom).agent(qga::guest_network_get_interfaces {}, AGENT_TIMEOUT) {
            Ok(interfaces) => (AgentState::Ready, routable_addresses(&interfaces)),
            Err(_) => (AgentState::NotResponding, Vec::new()),
        }
    }

    /// Waits until the guest agent answers `guest-ping`, or `deadline`: tried
    /// again at once after each event of the domain (the agent's port opening
    /// in the guest is one), else after growing sleeps.
    pub(super) fn wait_for_agent(&self, dom: &Domain, name: &str, deadline: Instant) -> Result<()> {
        let guest = Guest::new(dom);
        let domain = crate::domain::domain_name(name);
        let mut backoff = Backoff::new(AGENT_POLL_FIRST, AGENT_POLL_MAX);
        loop {
            let seen = super::events::count(&domain);
            match guest.agent(qga::guest_ping {}, AGENT_TIMEOUT) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(anyhow!(
                        "{name}: the guest agent did not answer guest-ping ({e}); \
                         if the image has no qemu-guest-agent, set agent = false in its [images] table"
                    )
                    .into());
                }
                Err(_) => {
                    let until = deadline.min(Instant::now() + backoff.step());
                    if super::events::wait_after(&domain, seen, until) {
                        backoff = Backoff::new(AGENT_POLL_FIRST, AGENT_POLL_MAX);
                    }
                }
            }
        }
    }

    /// The environment `exec` runs commands with: a `PATH` that finds programs
    /// on NixOS and on other distributions, `HOME`, then the VM's env (the
    /// values its last start got), which may override both. qemu-ga gives a
    /// command exactly this environment, not its own.
    fn exec_env(&self, name: &str) -> Result<Vec<String>> {
        let mut env = vec![EXEC_PATH.to_string(), "HOME=/root".to_string()];
        let path = self.home.vm_env_file(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => env.extend(text.lines().map(str::to_string)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow!(e)
                    .context(format!("reading the VM's env {}", path.display()))
                    .into());
            }
        }
        Ok(env)
    }

    pub(super) fn exec_in(
        &self,
        dom: &Domain,
        state: &VmState,
        argv: &[String],
        stdin: Option<&[u8]>,
        timeout: Duration,
        output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        let (path, args) = argv
            .split_first()
            .ok_or_else(|| anyhow!("exec needs a command: agentvm exec NAME -- CMD [ARG…]"))?;
        self.require_agent(state, "exec")?;
        let guest = Guest::new(dom);
        let started = guest
            .agent(
                qga::guest_exec {
                    path: path.clone(),
                    arg: Some(args.to_vec()),
                    env: Some(self.exec_env(&state.name)?),
                    input_data: stdin.map(<[u8]>::to_vec),
                    capture_output: Some(qga::GuestExecCaptureOutput::flag(true)),
                },
                AGENT_TIMEOUT,
            )
            .map_err(guest_error)?;
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new(EXEC_POLL_FIRST, EXEC_POLL_MAX);
        loop {
            let status = guest
                .agent(qga::guest_exec_status { pid: started.pid }, AGENT_TIMEOUT)
                .map_err(guest_error)?;
            // qemu-ga hands over captured output once the command has exited.
            if let Some(out) = &status.out_data {
                output(Stream::Stdout, out);
            }
            if let Some(err) = &status.err_data {
                output(Stream::Stderr, err);
            }
            if status.exited {
                return Ok(ExecOutcome {
                    exit_code: status.exitcode,
                    signal: status.signal,
                });
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "{}: the command did not finish within {}s (it keeps running in the guest as pid {})",
                    state.name,
                    timeout.as_secs(),
                    started.pid
                )
                .into());
            }
            backoff.sleep_until(deadline);
        }
    }

    fn require_agent(&self, state: &VmState, what: &str) -> Result<()> {
        if state.agent {
            Ok(())
        } else {
            Err(anyhow!(
                "{}: {what} needs the guest agent, and image {} has agent = false",
                state.name,
                state.image
            )
            .into())
        }
    }

    /// Reads the host key through the agent (or, with no agent, by scanning the
    /// forwarded SSH port) and pins it into the VM's known_hosts.
    pub(super) fn pin_host_key(&self, dom: &Domain, state: &VmState) -> Result<HostKey> {
        let name = state.name.as_str();
        let from_agent = if state.agent {
            match read_guest_file(&Guest::new(dom), &state.host_key) {
                Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
                Err(GuestError::AgentUnavailable(why)) => {
                    tracing::warn!("{name}: {why}");
                    None
                }
                Err(e) => return Err(anyhow!("{name}: reading {}: {e}", state.host_key).into()),
            }
        } else {
            None
        };
        let (key, source) = match from_agent {
            Some(text) => (
                crate::ssh::public_key_of(&text)
                    .with_context(|| format!("{name}: {}", state.host_key))?,
                "agent",
            ),
            None => (keyscan(state.ssh_port)?, "ssh-keyscan"),
        };
        let known_hosts = self.home.vm_known_hosts(name);
        let alias = format!("agentvm-{name}");
        write_atomic(&known_hosts, format!("{alias} {key}\n").as_bytes(), 0o600)?;
        write_atomic(
            &self.home.vm_pinned_host_key(name),
            format!("{key}\n").as_bytes(),
            0o600,
        )?;
        Ok(HostKey {
            key,
            source: source.into(),
            known_hosts,
        })
    }
}

impl GuestAgent for LocalBackend {
    fn agent_expected(&self, name: &str) -> Result<bool> {
        Ok(self.require(name)?.1.agent)
    }

    fn wait_agent(&self, name: &str, deadline: Instant) -> Result<()> {
        let (dom, _) = self.require(name)?;
        self.wait_for_agent(&dom, name, deadline)
    }

    fn agent_shutdown(&self, name: &str) -> Result<()> {
        let (dom, state) = self.require_running(name)?;
        self.require_agent(&state, "shutdown through the agent")?;
        let guest = Guest::new(&dom);
        guest
            .agent(qga::guest_ping {}, AGENT_TIMEOUT)
            .map_err(guest_error)?;
        // guest-shutdown sends no reply when it works: the guest goes away.
        let _ = guest.agent(
            qga::guest_shutdown {
                mode: Some(qga::GuestShutdownMode::Powerdown),
            },
            AGENT_TIMEOUT,
        );
        Ok(())
    }

    fn exec(
        &self,
        name: &str,
        argv: &[String],
        stdin: Option<&[u8]>,
        timeout: Duration,
        output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        let (dom, state) = self.require_running(name)?;
        self.exec_in(&dom, &state, argv, stdin, timeout, output)
    }

    fn host_key(&self, name: &str) -> Result<HostKey> {
        let (dom, state) = self.require_running(name)?;
        self.pin_host_key(&dom, &state)
    }

    fn sync_clock(&self, name: &str) -> Result<i64> {
        let (dom, state) = self.require_running(name)?;
        self.require_agent(&state, "setting the clock")?;
        let guest = Guest::new(&dom);
        let before = guest
            .agent(qga::guest_get_time {}, AGENT_TIMEOUT)
            .map_err(guest_error)?;
        let now = unix_nanos();
        // qemu-ga sets the system clock, then runs `hwclock -w`; a guest
        // without hwclock reports an error although its clock was set, so
        // the clock read back decides.
        let set = guest.agent(qga::guest_set_time { time: Some(now) }, AGENT_TIMEOUT);
        let after = guest
            .agent(qga::guest_get_time {}, AGENT_TIMEOUT)
            .map_err(guest_error)?;
        if (after - unix_nanos()).abs() > CLOCK_TOLERANCE_NS {
            return Err(anyhow!(
                "{name}: the guest clock is still {} s off after guest-set-time ({})",
                (after - unix_nanos()) / 1_000_000_000,
                match set {
                    Ok(_) => "which said it was set".to_string(),
                    Err(e) => e.to_string(),
                }
            )
            .into());
        }
        if let Err(e) = set {
            tracing::info!("{name}: clock set; guest-set-time also said: {e}");
        }
        Ok((before - now) / 1_000_000)
    }

    fn read_file(&self, name: &str, path: &str) -> Result<Vec<u8>> {
        let (dom, state) = self.require_running(name)?;
        self.require_agent(&state, "reading guest files")?;
        read_guest_file(&Guest::new(&dom), path)
            .map_err(|e| anyhow!("{name}: reading {path} through the guest agent: {e}").into())
    }

    fn read_file_range(
        &self,
        name: &str,
        path: &str,
        offset: u64,
        length: usize,
    ) -> Result<Vec<u8>> {
        let (dom, state) = self.require_running(name)?;
        self.require_agent(&state, "reading guest files")?;
        read_guest_range(&Guest::new(&dom), path, offset, length)
            .map_err(|e| anyhow!("{name}: reading {path} through the guest agent: {e}").into())
    }

    fn append_file(&self, name: &str, path: &str, data: &[u8]) -> Result<()> {
        let (dom, state) = self.require_running(name)?;
        self.require_agent(&state, "writing guest files")?;
        write_guest_file(&Guest::new(&dom), path, data, "a")
            .map_err(|e| anyhow!("{name}: writing {path} through the guest agent: {e}").into())
    }

    fn write_file(&self, name: &str, path: &str, data: &[u8], mode: Option<u32>) -> Result<()> {
        let (dom, state) = self.require_running(name)?;
        self.require_agent(&state, "writing guest files")?;
        write_guest_file(&Guest::new(&dom), path, data, "w")
            .map_err(|e| anyhow!("{name}: writing {path} through the guest agent: {e}"))?;
        if let Some(mode) = mode {
            crate::backend::chmod_through_agent(self, name, path, mode)?;
        }
        Ok(())
    }
}

/// How far a guest clock may be from the host's right after it was set.
const CLOCK_TOLERANCE_NS: i64 = 2_000_000_000;

fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

fn guest_error(e: GuestError) -> BackendError {
    BackendError::Other(anyhow!(e))
}

/// The most one `guest-file-read`/`guest-file-write` moves.
const FILE_CHUNK: usize = 48 * 1024;

fn read_guest_file(guest: &Guest, path: &str) -> Result<Vec<u8>, GuestError> {
    let handle = guest.agent(
        qga::guest_file_open {
            path: path.to_string(),
            mode: Some("r".into()),
        },
        AGENT_TIMEOUT,
    )?;
    let mut data = Vec::new();
    let result = loop {
        match guest.agent(
            qga::guest_file_read {
                handle,
                count: Some(FILE_CHUNK as i64),
            },
            AGENT_TIMEOUT,
        ) {
            Ok(chunk) => {
                data.extend_from_slice(&chunk.buf_b64);
                if chunk.eof || chunk.count == 0 {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
    };
    let _ = guest.agent(qga::guest_file_close { handle }, AGENT_TIMEOUT);
    result.map(|()| data)
}

/// Up to `length` bytes of the guest file `path` from `offset`, in chunks;
/// fewer only at its end.
fn read_guest_range(
    guest: &Guest,
    path: &str,
    offset: u64,
    length: usize,
) -> Result<Vec<u8>, GuestError> {
    let handle = guest.agent(
        qga::guest_file_open {
            path: path.to_string(),
            mode: Some("r".into()),
        },
        AGENT_TIMEOUT,
    )?;
    let mut data = Vec::with_capacity(length);
    let result = (|| {
        if offset > 0 {
            guest.agent(
                qga::guest_file_seek {
                    handle,
                    offset: i64::try_from(offset).unwrap_or(i64::MAX),
                    whence: qga::GuestFileWhence::name(qga::QGASeek::set),
                },
                AGENT_TIMEOUT,
            )?;
        }
        while data.len() < length {
            let want = (length - data.len()).min(FILE_CHUNK);
            let chunk = guest.agent(
                qga::guest_file_read {
                    handle,
                    count: Some(want as i64),
                },
                AGENT_TIMEOUT,
            )?;
            data.extend_from_slice(&chunk.buf_b64);
            if chunk.eof || chunk.count == 0 {
                break;
            }
        }
        Ok(())
    })();
    let _ = guest.agent(qga::guest_file_close { handle }, AGENT_TIMEOUT);
    result.map(|()| data)
}

/// Writes `data` to the guest file `path` in chunks: `mode` "w" makes or
/// replaces it, "a" adds to its end.
fn write_guest_file(guest: &Guest, path: &str, data: &[u8], mode: &str) -> Result<(), GuestError> {
    let handle = guest.agent(
        qga::guest_file_open {
            path: path.to_string(),
            mode: Some(mode.into()),
        },
        AGENT_TIMEOUT,
    )?;
    let result = data.chunks(FILE_CHUNK).try_for_each(|chunk| {
        let mut rest = chunk;
        while !rest.is_empty() {
            let written = guest.agent(
                qga::guest_file_write {
                    handle,
                    buf_b64: rest.to_vec(),
                    count: Some(rest.len() as i64),
                },
                AGENT_TIMEOUT,
            )?;
            let n = usize::try_from(written.count).unwrap_or(0).min(rest.len());
            if n == 0 {
                return Err(GuestError::Reply {
                    command: "guest-file-write",
                    message: format!("wrote nothing of the last {} bytes", rest.len()),
                });
            }
            rest = &rest[n..];
        }
        Ok(())
    });
    let closed = guest.agent(qga::guest_file_close { handle }, AGENT_TIMEOUT);
    result.and(closed.map(|_| ()))
}

/// The guest's ed25519 host key as its forwarded SSH port presents it.
fn keyscan(port: u16) -> Result<String> {
    tracing::warn!("no guest agent: taking the host key from an SSH key scan of port {port}");
    let out = Command::new("ssh-keyscan")
        .args([
            "-T",
            "10",
            "-t",
            "ed25519",
            "-p",
            &port.to_string(),
            LISTEN_ADDRESS,
        ])
        .output()
        .context("running ssh-keyscan (openssh-client)")?;
    Ok(
        crate::ssh::public_key_of(&String::from_utf8_lossy(&out.stdout)).with_context(|| {
            format!(
                "ssh-keyscan of port {port}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?,
    )
}

fn routable_addresses(interfaces: &[qga::GuestNetworkInterface]) -> Vec<String> {
    interfaces
        .iter()
        .flat_map(|i| i.ip_addresses.iter().flatten())
        .filter_map(|a| a.ip_address.parse::<IpAddr>().ok())
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
            IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
        })
        .map(|ip| ip.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_link_local_addresses_are_left_out() {
        let interfaces: Vec<qga::GuestNetworkInterface> = serde_json::from_str(
            r#"[{"name":"lo","ip-addresses":[{"ip-address":"127.0.0.1","ip-address-type":"ipv4","prefix":8},{"ip-address":"::1","ip-address-type":"ipv6","prefix":128}]},
                {"name":"eth0","ip-addresses":[{"ip-address":"10.0.2.15","ip-address-type":"ipv4","prefix":24},{"ip-address":"fe80::5054:ff:fe12:3456","ip-address-type":"ipv6","prefix":64},{"ip-address":"169.254.1.1","ip-address-type":"ipv4","prefix":16},{"ip-address":"fec0::5054:ff:fe12:3456","ip-address-type":"ipv6","prefix":64}]}]"#,
        )
        .unwrap();
        assert_eq!(
            routable_addresses(&interfaces),
            ["10.0.2.15", "fec0::5054:ff:fe12:3456"]
        );
    }
}
