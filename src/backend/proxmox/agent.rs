//! The Proxmox backend's guest agent, through the API's `agent/*` calls:
//! readiness, shutdown, the host key (`agent/file-read`) and the env, written
//! to [`GUEST_ENV_PATH`] with `agent/file-write` as soon as the agent answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use super::{AGENT_QUICK, Client, Found, POLL, ProxmoxBackend, PveError, pve};
use crate::backend::{EnvDelivery, ExecOutcome, GuestAgent, HostKey, Result, Stream};
use crate::fsutil::write_atomic;
use crate::nocloud::GUEST_ENV_PATH;
use crate::progress::Reporter;
use crate::spec::{DEFAULT_HOST_KEY, VmSpec, env_file};

/// How long the daemon keeps trying to deliver an env after a start.
const DELIVERY_WINDOW: Duration = Duration::from_secs(600);
/// The most `agent/file-write` takes: its `content` parameter's maxLength
/// (61440), which the base64 agentvm sends fills at 4 characters per 3 bytes.
pub const MAX_FILE_WRITE: usize = 61440 / 4 * 3;
/// The folder of [`GUEST_ENV_PATH`], made root-only when a guest lacks it.
const GUEST_ENV_DIR: &str = "/etc/agentvm";

/// The env deliveries this backend runs or ran, by VM name.
#[derive(Default, Clone)]
pub(super) struct Deliveries(Arc<Mutex<HashMap<String, Delivery>>>);

#[derive(Clone)]
struct Delivery {
    /// Counts the deliveries to this VM; a thread updates only its own.
    generation: u64,
    state: EnvDelivery,
    error: Option<String>,
}

impl Deliveries {
    fn get(&self, name: &str) -> Option<Delivery> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Records a new pending delivery; returns its generation.
    fn begin(&self, name: &str) -> u64 {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let generation = map.get(name).map_or(1, |d| d.generation + 1);
        map.insert(
            name.to_string(),
            Delivery {
                generation,
                state: EnvDelivery::Pending,
                error: None,
            },
        );
        generation
    }

    fn end(&self, name: &str, generation: u64, result: std::result::Result<(), String>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get_mut(name)
            && d.generation == generation
        {
            match result {
                Ok(()) => d.state = EnvDelivery::Delivered,
                Err(e) => {
                    d.state = EnvDelivery::Failed;
                    d.error = Some(e);
                }
            }
        }
    }

    pub(super) fn forget(&self, name: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }
}

impl ProxmoxBackend {
    /// Where the env of a running VM with env names `names` is: what this
    /// daemon's delivery says, or (after a daemon restart) whether the guest's
    /// env file holds every name.
    pub(super) fn env_delivery(
        &self,
        name: &str,
        found: &Found,
        names: &[String],
    ) -> Option<EnvDelivery> {
        if !found.running || names.is_empty() {
            return None;
        }
        if let Some(delivery) = self.deliveries.get(name) {
            return Some(delivery.state);
        }
        let held = self
            .client
            .get_quick(
                &Self::path_of(found, "/agent/file-read"),
                &[
                    ("file", GUEST_ENV_PATH.to_string()),
                    ("decode", "0".to_string()),
                ],
                AGENT_QUICK,
            )
            .ok()
            .and_then(|reply| file_content(&reply))
            .is_some_and(|text| {
                let keys: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.split_once('=').map(|(k, _)| k))
                    .collect();
                names.iter().all(|n| keys.contains(&n.as_str()))
            });
        Some(if held {
            EnvDelivery::Delivered
        } else {
            EnvDelivery::Pending
        })
    }

    /// Reads a guest file through `agent/file-read`, as exact bytes (`decode=0`:
    /// PVE hands over the agent's base64). A file larger than one reply
    /// (`truncated`) is read on from where the last reply ended.
    fn read_guest_file(&self, found: &Found, file: &str) -> anyhow::Result<Vec<u8>> {
        self.read_guest_range(found, file, 0, None)
    }

    /// Reads from `offset` up to `length` bytes (all to the end with `None`);
    /// fewer only at the file's end.
    fn read_guest_range(
        &self,
        found: &Found,
        file: &str,
        offset: u64,
        length: Option<usize>,
    ) -> anyhow::Result<Vec<u8>> {
        use base64::Engine as _;
        let mut data = Vec::new();
        loop {
            let mut params = vec![("file", file.to_string()), ("decode", "0".to_string())];
            let at = offset + data.len() as u64;
            if at > 0 {
                params.push(("offset", at.to_string()));
            }
            if let Some(length) = length {
                if data.len() >= length {
                    return Ok(data);
                }
                params.push(("count", (length - data.len()).to_string()));
            }
            let reply = self
                .client
                .get(&Self::path_of(found, "/agent/file-read"), &params)?;
            let encoded = reply["content"].as_str().ok_or_else(|| {
                anyhow!("agent/file-read answered {reply} without base64 content")
            })?;
            let chunk = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| anyhow!("agent/file-read answered content that is not base64: {e}"))?;
            data.extend_from_slice(&chunk);
            if !super::exec::truthy(&reply["truncated"]) || chunk.is_empty() {
                return Ok(data);
            }
        }
    }

    fn running(&self, name: &str) -> Result<(Found, super::Marker)> {
        let (found, marker) = self.managed(name)?;
        if !found.running {
            return Err(anyhow!("{name} is not running (agentvm up {name})").into());
        }
        Ok((found, marker))
    }
}

impl GuestAgent for ProxmoxBackend {
    /// agentvm sets `agent: 1` on every VM it makes; a VM whose config has it
    /// off (changed by hand) is not waited for.
    fn agent_expected(&self, name: &str) -> Result<bool> {
        let (found, _) = self.managed(name)?;
        Ok(super::agent_enabled(&found.config))
    }

    fn wait_agent(&self, name: &str, deadline: Instant) -> Result<()> {
        let (found, _) = self.managed(name)?;
        // The agent answers 500 "not running" until the guest has booted it.
        loop {
            match self.client.post_quick(
                &Self::path_of(&found, "/agent/ping"),
                &[],
                super::call_limit(deadline),
            ) {
                Ok(_) => return Ok(()),
                Err(e @ (PveError::Unauthorized { .. } | PveError::Forbidden { .. })) => {
                    return Err(pve(e));
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("{name}: agent/ping: {e}");
                }
                Err(e) => {
                    let last = super::agent_answer(&e);
                    return Err(anyhow!(
                    "{name}: the guest agent did not answer in time (is qemu-guest-agent installed and running in the guest?); last answer: {last}"
                )
                .into());
                }
            }
            std::thread::sleep(POLL);
        }
    }

    fn agent_shutdown(&self, name: &str) -> Result<()> {
        let (found, _) = self.managed(name)?;
        self.client
            .post(&Self::path_of(&found, "/agent/shutdown"), &[])
            .map_err(pve)?;
        Ok(())
    }

    fn deliver_env(&self, spec: &VmSpec, progress: &dyn Reporter) -> Result<()> {
        let name = spec.name.as_str();
        if spec.env.is_empty() {
            self.deliveries.forget(name);
            return Ok(());
        }
        let content = env_file(&spec.env);
        if content.len() > MAX_FILE_WRITE {
            return Err(anyhow!(
                "vms.{name}.env: {} bytes; Proxmox's agent/file-write takes at most {MAX_FILE_WRITE} (61440 in base64)",
                content.len()
            )
            .into());
        }
        let (found, _) = self.managed(name)?;
        let generation = self.deliveries.begin(name);
        progress.step(
            name,
            &format!(
                "env: delivering {} variable(s) through the guest agent",
                spec.env.len()
            ),
        );
        let job = EnvJob {
            client: self.client.clone(),
            vm: name.to_string(),
            path: Self::path_of(&found, ""),
            content: {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(content.as_bytes())
            },
        };
        let deliveries = self.deliveries.clone();
        std::thread::Builder::new()
            .name(format!("env-{name}"))
            .spawn(move || {
                let result = job.run(Instant::now() + DELIVERY_WINDOW);
                match &result {
                    Ok(()) => tracing::info!("{}: env delivered to {GUEST_ENV_PATH}", job.vm),
                    Err(e) => tracing::warn!("{}: env not delivered: {e}", job.vm),
                }
                deliveries.end(&job.vm, generation, result);
            })
            .context("starting the env delivery")?;
        Ok(())
    }

    fn wait_env(&self, name: &str, deadline: Instant) -> Result<()> {
        loop {
            match self.deliveries.get(name) {
                None => return Ok(()),
                Some(d) => match d.state {
                    EnvDelivery::Delivered => return Ok(()),
                    EnvDelivery::Failed => {
                        return Err(anyhow!(
                            "{name}: the env was not delivered: {}",
                            d.error.unwrap_or_default()
                        )
                        .into());
                    }
                    EnvDelivery::Pending if Instant::now() >= deadline => {
                        return Err(anyhow!(
                            "{name}: the env is not delivered yet: the guest agent has not answered (the daemon keeps trying; see `agentvm status {name}`)"
                        )
                        .into());
                    }
                    EnvDelivery::Pending => std::thread::sleep(Duration::from_millis(100)),
                },
            }
        }
    }

    fn exec(
        &self,
        name: &str,
        argv: &[String],
        stdin: Option<&[u8]>,
        timeout: Duration,
        output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        let (found, _) = self.managed(name)?;
        if !found.running {
            return Err(anyhow!("{name} is not running (agentvm up {name})").into());
        }
        self.exec_in(&found, name, argv, stdin, timeout, output)
    }

    fn host_key(&self, name: &str) -> Result<HostKey> {
        let (found, marker) = self.managed(name)?;
        if !found.running {
            return Err(anyhow!("{name} is not running (agentvm up {name})").into());
        }
        let file = marker.host_key.as_deref().unwrap_or(DEFAULT_HOST_KEY);
        let bytes = self
            .read_guest_file(&found, file)
            .map_err(|e| anyhow!("{name}: reading {file} through the guest agent: {e}"))?;
        let text = String::from_utf8_lossy(&bytes);
        let key = crate::ssh::public_key_of(&text).with_context(|| format!("{name}: {file}"))?;
        let dir = self.known_hosts_dir(name);
        crate::fsutil::create_private_dir(&dir)?;
        let known_hosts = dir.join(crate::paths::VM_KNOWN_HOSTS_FILE);
        write_atomic(
            &known_hosts,
            format!("agentvm-{name} {key}\n").as_bytes(),
            0o600,
        )?;
        write_atomic(
            &dir.join(crate::paths::VM_PINNED_HOST_KEY_FILE),
            format!("{key}\n").as_bytes(),
            0o600,
        )?;
        Ok(HostKey {
            key,
            source: "agent".into(),
            known_hosts,
        })
    }

    fn read_file(&self, name: &str, path: &str) -> Result<Vec<u8>> {
        let (found, _) = self.running(name)?;
        Ok(self
            .read_guest_file(&found, path)
            .map_err(|e| anyhow!("{name}: reading {path} through the guest agent: {e}"))?)
    }

    fn read_file_range(
        &self,
        name: &str,
        path: &str,
        offset: u64,
        length: usize,
    ) -> Result<Vec<u8>> {
        let (found, _) = self.running(name)?;
        Ok(self
            .read_guest_range(&found, path, offset, Some(length))
            .map_err(|e| anyhow!("{name}: reading {path} through the guest agent: {e}"))?)
    }

    /// `agent/file-write` cannot append: each piece of at most
    /// [`MAX_FILE_WRITE`] bytes is written to a part file beside `path`, then
    /// added to it with `cat` run through the agent.
    fn append_file(&self, name: &str, path: &str, data: &[u8]) -> Result<()> {
        let part = format!("{path}.agentvm-part");
        for piece in data.chunks(MAX_FILE_WRITE) {
            self.write_file(name, &part, piece, None)?;
            let argv = [
                "/bin/sh".to_string(),
                "-c".to_string(),
                "cat \"$0\" >> \"$1\"; s=$?; rm -f \"$0\"; exit $s".to_string(),
                part.clone(),
                path.to_string(),
            ];
            let ran = crate::backend::exec_captured(self, name, &argv, Duration::from_secs(60))?;
            if !ran.succeeded() {
                return Err(anyhow!(
                    "{name}: adding to {path} through the guest agent: {}",
                    ran.stderr_text()
                )
                .into());
            }
        }
        Ok(())
    }

    /// `agent/file-write` cannot append, so a file goes in one call: at most
    /// [`MAX_FILE_WRITE`] bytes (`append_file` adds more).
    fn write_file(&self, name: &str, path: &str, data: &[u8], mode: Option<u32>) -> Result<()> {
        use base64::Engine as _;
        if data.len() > MAX_FILE_WRITE {
            return Err(anyhow!(
                "{name}: {path}: {} bytes; Proxmox's agent/file-write takes at most {MAX_FILE_WRITE} bytes (61440 characters of base64) and cannot append",
                data.len()
            )
            .into());
        }
        let (found, _) = self.running(name)?;
        self.client
            .post(
                &Self::path_of(&found, "/agent/file-write"),
                &[
                    ("file", path.to_string()),
                    (
                        "content",
                        base64::engine::general_purpose::STANDARD.encode(data),
                    ),
                    ("encode", "0".to_string()),
                ],
            )
            .map_err(|e| anyhow!("{name}: writing {path} through the guest agent: {e}"))?;
        if let Some(mode) = mode {
            crate::backend::chmod_through_agent(self, name, path, mode)?;
        }
        Ok(())
    }
}

/// The text of an `agent/file-read` reply made with `decode=0`.
fn file_content(reply: &serde_json::Value) -> Option<String> {
    use base64::Engine as _;
    let encoded = reply["content"].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// One env delivery, run on its own thread.
struct EnvJob {
    client: Client,
    vm: String,
    /// `/nodes/{node}/qemu/{vmid}`.
    path: String,
    /// The env file, base64.
    content: String,
}

impl EnvJob {
    /// Writes the env file once the agent answers; makes its folder (root
    /// only) through the agent when the guest has none.
    fn run(&self, deadline: Instant) -> std::result::Result<(), String> {
        self.wait_agent(deadline)?;
        let mut made_dir = false;
        loop {
            let written = self.client.post(
                &format!("{}/agent/file-write", self.path),
                // Base64 made here (`encode=0`): PVE's own encoding takes
                // each character as one byte, which breaks UTF-8 values.
                &[
                    ("file", GUEST_ENV_PATH.to_string()),
                    ("content", self.content.clone()),
                    ("encode", "0".to_string()),
                ],
            );
            let e = match written {
                Ok(_) => return Ok(()),
                Err(e @ (PveError::Unauthorized { .. } | PveError::Forbidden { .. })) => {
                    return Err(e.to_string());
                }
                Err(e) => e,
            };
            let text = e.to_string();
            if text.contains("No such file or directory") && !made_dir {
                made_dir = true;
                self.make_dir()?;
                continue;
            }
            if Instant::now() >= deadline {
                return Err(format!("the guest agent did not take it: {text}"));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Pings the agent until it answers.
    fn wait_agent(&self, deadline: Instant) -> std::result::Result<(), String> {
        loop {
            let answer = self.client.post_quick(
                &format!("{}/agent/ping", self.path),
                &[],
                super::call_limit(deadline),
            );
            match answer {
                Ok(_) => return Ok(()),
                Err(e @ (PveError::Unauthorized { .. } | PveError::Forbidden { .. })) => {
                    return Err(e.to_string());
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "the guest agent did not answer within {} s; its last answer: {}",
                        DELIVERY_WINDOW.as_secs(),
                        super::agent_answer(&e)
                    ));
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    fn make_dir(&self) -> std::result::Result<(), String> {
        let command = ["mkdir", "-p", "-m", "0700", GUEST_ENV_DIR];
        let params: Vec<(&str, String)> =
            command.iter().map(|a| ("command", a.to_string())).collect();
        let started = self
            .client
            .post_once(&format!("{}/agent/exec", self.path), &params)
            .map_err(|e| format!("making {GUEST_ENV_DIR} in the guest: {e}"))?;
        let pid = started["pid"]
            .as_u64()
            .ok_or("agent/exec answered no pid")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self
                .client
                .get(
                    &format!("{}/agent/exec-status", self.path),
                    &[("pid", pid.to_string())],
                )
                .map_err(|e| format!("making {GUEST_ENV_DIR} in the guest: {e}"))?;
            if super::exec::truthy(&status["exited"]) {
                return match status["exitcode"].as_i64() {
                    Some(0) => Ok(()),
                    code => Err(format!(
                        "making {GUEST_ENV_DIR} in the guest failed ({code:?}): {}",
                        status["err-data"].as_str().unwrap_or_default().trim()
                    )),
                };
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "making {GUEST_ENV_DIR} in the guest took over 30 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
