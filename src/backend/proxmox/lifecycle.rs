//! The Proxmox backend's steps for the orchestration in `backend::orchestrate`,
//! and what `status`, `list`, `plan` and `ssh` need. VMs are found cluster-wide
//! and every call goes to the node a VM is on now.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::anyhow;
use serde_json::Value;

use super::{AUTO_NODE, Found, POLL, ProxmoxBackend, boot_disk, pve};
use crate::backend::{
    AgentState, Change, Existing, Lifecycle, Plan, Prepared, Result, State, Timings, VmStatus,
};
use crate::progress::{Reporter, Silent};
use crate::spec::{DEFAULT_HOST_KEY, ImageSpec, ProxmoxSpec, VmSpec};
use crate::ssh::Endpoint;

/// What `prepare` found for `create`/`reconfigure`.
struct Ready {
    /// The guest's host key file, when the image names another than the default.
    host_key: Option<String>,
}

/// A VM's env needs the guest agent on Proxmox: refuse one with env whose image has none.
fn check_env_needs_agent(spec: &VmSpec, image: Option<&ImageSpec>) -> Result<()> {
    if let Some(image) = image
        && !image.agent
        && !crate::backend::env_names(spec).is_empty()
    {
        return Err(anyhow!(
            "vms.{}: has env, and image {} has agent = false: on Proxmox the env reaches the guest \
             only through its agent (install qemu-guest-agent in the image and set agent = true, \
             or remove env/pass_env from this VM)",
            spec.name,
            image.name
        )
        .into());
    }
    Ok(())
}

fn host_key_of(image: Option<&ImageSpec>) -> Option<String> {
    image
        .map(|i| i.host_key.clone())
        .filter(|path| path != DEFAULT_HOST_KEY)
}

impl ProxmoxBackend {
    /// The hash of `spec` on this backend: the machine, the backend's settings,
    /// and what the marker records (host key file, SSH host).
    pub(super) fn hash_with(&self, spec: &VmSpec, host_key: Option<&str>) -> String {
        // What only `image push` uses makes no VM.
        let settings = ProxmoxSpec {
            import_storage: None,
            bridge: None,
            ..self.spec.clone()
        };
        let canonical = serde_json::to_vec(&(
            spec.machine(),
            &settings,
            host_key,
            spec.ssh_host.as_deref(),
        ))
        .expect("specs serialize to JSON");
        format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&canonical))
        )
    }

    /// Every VM of the cluster agentvm manages (its marker, or the backend's
    /// pool), with `specs` for the ones they name; with `agents`, each running
    /// VM's agent is asked for its addresses, all VMs at once.
    fn scan(&self, specs: &[VmSpec], agents: bool) -> Result<Vec<VmStatus>> {
        let resources = self.resources()?;
        let candidates: Vec<&Value> = resources
            .iter()
            .filter(|r| r["template"] != 1 && r["name"].is_string() && r["status"] != "unknown")
            .collect();
        let rows: Vec<Result<Option<VmStatus>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = candidates
                .iter()
                .map(|r| scope.spawn(move || self.row(r, specs, agents)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("listing a VM panicked").into()))
                })
                .collect()
        });
        let mut out = Vec::new();
        for row in rows {
            out.extend(row?);
        }
        // VMs on offline nodes: shown by the name agentvm knows for them.
        for vm in self.unreachable(&resources) {
            let Some(name) = vm.name else { continue };
            let spec = specs.iter().find(|s| s.name.as_str() == name);
            let mut status = VmStatus::absent(&name, &self.name, spec);
            status.state = State::Unknown;
            status.node = Some(vm.node);
            out.push(status);
        }
        Ok(out)
    }

    /// One `/cluster/resources` VM as a status row, if agentvm manages it.
    fn row(&self, r: &Value, specs: &[VmSpec], agents: bool) -> Result<Option<VmStatus>> {
        let name = r["name"].as_str().unwrap_or_default();
        let spec = specs.iter().find(|s| s.name.as_str() == name);
        let in_pool = self.spec.pool.as_deref().is_some_and(|p| r["pool"] == p);
        let found = self.found(r)?;
        if found.marker.is_none() && !in_pool {
            return Ok(None);
        }
        let mut status = self.status_of(name, &found, spec);
        if agents {
            self.ask_agent(name, &found, &mut status);
        }
        Ok(Some(status))
    }

    /// Fills in the agent state, addresses and env delivery of a running VM
    /// (each agent call limited to a short time).
    fn ask_agent(&self, name: &str, found: &Found, status: &mut VmStatus) {
        if status.agent != AgentState::NotResponding {
            return;
        }
        if let Ok(ips) = self.guest_ips(found, super::AGENT_QUICK) {
            status.agent = AgentState::Ready;
            status.ips = ips.iter().map(ToString::to_string).collect();
        }
        status.env_delivery = self.env_delivery(name, found, &status.env);
    }

    /// The address `ssh` reaches the guest on: the pinned `ssh_host`, else the
    /// first routable address its agent reports (IPv4 before IPv6).
    fn ssh_address(&self, found: &Found, name: &str, deadline: Instant) -> Result<String> {
        if let Some(host) = found.marker.as_ref().and_then(|m| m.ssh_host.clone()) {
            return Ok(host);
        }
        let ips = self
            .guest_ips(found, super::call_limit(deadline))
            .map_err(|e| {
                anyhow!(
                    "{name}: no address from the guest agent; its last answer: {}",
                    super::agent_answer(&e)
                )
            })?;
        ips.first().map(ToString::to_string).ok_or_else(|| {
            anyhow!("{name}: the guest reports no routable address (only loopback or link-local)")
                .into()
        })
    }
}

impl Lifecycle for ProxmoxBackend {
    fn kind(&self) -> &'static str {
        "proxmox"
    }

    fn find(&self, name: &str) -> Result<Option<Existing>> {
        let Some(found) = self.lookup(name)? else {
            return Ok(None);
        };
        let marker = found.marker.ok_or_else(|| {
            anyhow!(
                "VM {name} (vmid {}) on {} was not created by agentvm; refusing to touch it",
                found.vmid,
                self.name
            )
        })?;
        Ok(Some(Existing {
            running: found.running,
            spec_hash: marker.spec_hash,
            readonly: marker.readonly,
            ssh_port: Some(self.spec.ssh_port),
            spice_port: None,
            // `create` refuses any other policy on Proxmox.
            egress: crate::spec::Egress::Open,
        }))
    }

    fn prepare(
        &self,
        spec: &VmSpec,
        image: Option<&ImageSpec>,
        _progress: &dyn Reporter,
    ) -> Result<Prepared> {
        check_env_needs_agent(spec, image)?;
        // `up --backend` may bring a local VM's spec here: never pretend.
        if !spec.egress.is_open() {
            return Err(self.unsupported(
                "egress policies",
                "restrict the VM with Proxmox firewall rules, and set egress = \"open\" for it",
            ));
        }
        let host_key = host_key_of(image);
        Ok(Prepared::new(
            self.hash_with(spec, host_key.as_deref()),
            Ready { host_key },
        ))
    }

    fn create(
        &self,
        spec: &VmSpec,
        prepared: &Prepared,
        timings: &mut Timings,
        progress: &dyn Reporter,
    ) -> Result<()> {
        let name = spec.name.as_str();
        let ready: &Ready = prepared.data();
        let source = self.template(spec)?;
        let (vmid, node) = self.clone_vm(spec, (source.vmid, &source.node), progress)?;
        timings.mark("clone");
        let at = (node.as_str(), vmid);
        let configured = self
            .client
            .get(&Self::vm_path(&node, vmid, "/config"), &[])
            .map_err(pve)
            .and_then(|config| {
                self.configure(
                    at,
                    spec,
                    &prepared.spec_hash,
                    ready.host_key.as_deref(),
                    progress,
                )?;
                self.grow_disk(at, spec, &config, progress)
            });
        if let Err(e) = configured {
            // Do not leave a half-configured clone behind.
            return Err(match self.purge(&node, vmid, progress, name) {
                Ok(()) => e,
                Err(cleanup) => {
                    anyhow!("{e}; removing the new VM (vmid {vmid}) failed too: {cleanup:#}").into()
                }
            });
        }
        timings.mark("configure");
        Ok(())
    }

    fn reconfigure(
        &self,
        spec: &VmSpec,
        prepared: &Prepared,
        existing: &Existing,
        timings: &mut Timings,
        progress: &dyn Reporter,
    ) -> Result<bool> {
        if existing.spec_hash == prepared.spec_hash {
            return Ok(false);
        }
        let ready: &Ready = prepared.data();
        let (found, _) = self.managed(spec.name.as_str())?;
        let at = (found.node.as_str(), found.vmid);
        self.configure(
            at,
            spec,
            &prepared.spec_hash,
            ready.host_key.as_deref(),
            progress,
        )?;
        self.grow_disk(at, spec, &found.config, progress)?;
        timings.mark("configure");
        Ok(true)
    }

    fn start(&self, name: &str, progress: &dyn Reporter) -> Result<()> {
        let (found, _) = self.managed(name)?;
        self.start_vm(&found, name, progress)
    }

    fn is_running(&self, name: &str) -> Result<bool> {
        let (found, _) = self.managed(name)?;
        let current = self
            .client
            .get(&Self::path_of(&found, "/status/current"), &[])
            .map_err(pve)?;
        Ok(current["status"] == "running")
    }

    /// The env first (delivered as soon as the agent answers), then an address
    /// from the agent, then the SSH banner on it.
    fn wait_ssh(&self, name: &str, deadline: Instant) -> Result<()> {
        use crate::backend::GuestAgent;
        self.wait_env(name, deadline)?;
        let (found, _) = self.managed(name)?;
        // The agent answers 500 "not running" until the guest has booted it.
        let host = loop {
            match self.ssh_address(&found, name, deadline) {
                Ok(host) => break host,
                Err(_) if Instant::now() < deadline => std::thread::sleep(POLL),
                Err(e) => return Err(e),
            }
        };
        let addr = loop {
            match std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), self.spec.ssh_port))
                .ok()
                .and_then(|mut a| a.next())
            {
                Some(addr) => break addr,
                None if Instant::now() < deadline => std::thread::sleep(POLL),
                None => return Err(anyhow!("{name}: ssh_host {host} does not resolve").into()),
            }
        };
        let addr: SocketAddr = addr;
        let timeout = deadline.saturating_duration_since(Instant::now());
        crate::ssh::wait_for_banner_at(addr, timeout, POLL, || Ok(true))
            .map_err(|e| anyhow!("{name}: {e}"))?;
        Ok(())
    }

    fn acpi_shutdown(&self, name: &str) -> Result<()> {
        let (found, _) = self.managed(name)?;
        // A task that ends when the guest is off; the orchestration watches the state.
        self.client
            .post(&Self::path_of(&found, "/status/shutdown"), &[])
            .map_err(pve)?;
        Ok(())
    }

    fn force_off(&self, name: &str) -> Result<()> {
        let (found, _) = self.managed(name)?;
        let upid = self
            .client
            .post(&Self::path_of(&found, "/status/stop"), &[])
            .map_err(pve)?;
        self.client.wait_task(&upid, "stop", &Silent, name)?;
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<()> {
        let (found, _) = self.managed(name)?;
        if found.running {
            self.force_off(name)?;
        }
        self.purge(&found.node, found.vmid, &Silent, name)?;
        self.deliveries.forget(name);
        let dir = self.known_hosts_dir(name);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(anyhow!(
                "{name} was removed from {}, but its folder {} was not: {e}",
                self.name,
                dir.display()
            )
            .into());
        }
        Ok(())
    }

    fn status(&self, name: &str, spec: Option<&VmSpec>) -> Result<VmStatus> {
        match self.lookup(name)? {
            Some(found) => {
                let mut status = self.status_of(name, &found, spec);
                self.ask_agent(name, &found, &mut status);
                Ok(status)
            }
            None => Ok(VmStatus::absent(name, &self.name, spec)),
        }
    }

    fn list(&self, specs: &[VmSpec]) -> Result<Vec<VmStatus>> {
        self.scan(specs, true)
    }

    fn states(&self) -> Result<Vec<(String, State)>> {
        Ok(self
            .scan(&[], false)?
            .into_iter()
            .map(|s| (s.name, s.state))
            .collect())
    }

    fn plan(&self, spec: &VmSpec, image: Option<&ImageSpec>) -> Result<Plan> {
        check_env_needs_agent(spec, image)?;
        let name = spec.name.as_str();
        let host_key = host_key_of(image);
        let hash = self.hash_with(spec, host_key.as_deref());
        let mut plan = Plan {
            name: name.to_string(),
            backend: self.name.clone(),
            ..Plan::default()
        };
        let desired = self.desired_config(spec, &hash, host_key.as_deref());
        let shown = |key: &str, value: &str| -> String {
            // Keys are long and the marker is multi-line: show what matters.
            match key {
                "sshkeys" => format!("{} key(s)", value.matches("%0A").count() + 1),
                "description" => value.lines().nth(1).unwrap_or_default().to_string(),
                _ => value.to_string(),
            }
        };
        match self.lookup(name)? {
            None => {
                let source = self.template(spec)?;
                let node = self.placement_node()?;
                plan.create = true;
                plan.changes.push(Change {
                    key: "clone".into(),
                    old: None,
                    new: format!(
                        "template {} on {} ({} clone) to node {node}{}; from {}",
                        source.vmid,
                        source.node,
                        if self.spec.full_clone {
                            "full"
                        } else {
                            "linked"
                        },
                        if self.spec.node == AUTO_NODE {
                            " (most free memory)"
                        } else {
                            ""
                        },
                        source.why
                    ),
                });
                for (key, value) in &desired {
                    plan.changes.push(Change {
                        key: key.to_string(),
                        old: None,
                        new: shown(key, value),
                    });
                }
                plan.resize = spec.disk.map(|d| d.to_string());
                plan.start = true;
            }
            Some(found) => {
                for (key, value) in &desired {
                    let old = found.config[*key]
                        .as_str()
                        .map(String::from)
                        .or_else(|| found.config[*key].as_u64().map(|n| n.to_string()));
                    let same = match *key {
                        "sshkeys" => {
                            old.as_deref()
                                .map(|o| o.replace(' ', "%20").replace('\n', "%0A"))
                                .as_deref()
                                == Some(value.as_str())
                                || old.as_deref() == Some(value.as_str())
                        }
                        _ => old.as_deref() == Some(value.as_str()),
                    };
                    if !same {
                        plan.changes.push(Change {
                            key: key.to_string(),
                            old: old.as_deref().map(|o| shown(key, o)),
                            new: shown(key, value),
                        });
                    }
                }
                if let (Some(want), Some((_, have))) = (spec.disk, boot_disk(&found.config))
                    && want.bytes() > have
                {
                    plan.resize = Some(want.to_string());
                }
                plan.start = !found.running;
                plan.restart_needed = found.running && !plan.changes.is_empty();
            }
        }
        Ok(plan)
    }

    fn ssh_endpoint(&self, name: &str) -> Result<Endpoint> {
        let (found, marker) = self.managed(name)?;
        if !found.running {
            return Err(anyhow!("{name} is not running (agentvm up {name})").into());
        }
        let host = self.ssh_address(&found, name, Instant::now() + super::AGENT_CALL)?;
        let dir = self.known_hosts_dir(name);
        crate::fsutil::create_private_dir(&dir)?;
        Ok(Endpoint {
            vm: name.to_string(),
            host,
            port: self.spec.ssh_port,
            user: marker.user,
            identity: self.identity.private_key.clone(),
            known_hosts: dir.join(crate::paths::VM_KNOWN_HOSTS_FILE),
            strict: dir.join(crate::paths::VM_PINNED_HOST_KEY_FILE).is_file(),
        })
    }
}
