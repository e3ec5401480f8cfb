//! The Proxmox backend's steps for the orchestration in `backend::orchestrate`,
//! and what `status`, `list`, `plan` and `ssh` need.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::anyhow;

use super::{POLL, ProxmoxBackend, boot_disk, pve};
use crate::backend::{
    AgentState, Change, Existing, Lifecycle, Plan, Prepared, Result, State, Timings, VmStatus,
};
use crate::progress::{Reporter, Silent};
use crate::spec::{ImageSpec, TemplateRef, VmSpec};
use crate::ssh::Endpoint;

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
        }))
    }

    fn prepare(
        &self,
        spec: &VmSpec,
        _image: Option<&ImageSpec>,
        _progress: &dyn Reporter,
    ) -> Result<Prepared> {
        // Proxmox VMs come from the backend's template, not from an image.
        Ok(Prepared::new(self.spec_hash(spec), ()))
    }

    fn create(
        &self,
        spec: &VmSpec,
        prepared: &Prepared,
        timings: &mut Timings,
        progress: &dyn Reporter,
    ) -> Result<()> {
        let name = spec.name.as_str();
        let vmid = self.clone_vm(spec, progress)?;
        timings.mark("clone");
        let configured = self
            .client
            .get(&self.vm_path(vmid, "/config"), &[])
            .map_err(pve)
            .and_then(|config| {
                self.configure(vmid, spec, &prepared.spec_hash, progress)?;
                self.grow_disk(vmid, spec, &config, progress)
            });
        if let Err(e) = configured {
            // Do not leave a half-configured clone behind.
            return Err(match self.purge(vmid, progress, name) {
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
        let (found, _) = self.managed(spec.name.as_str())?;
        self.configure(found.vmid, spec, &prepared.spec_hash, progress)?;
        self.grow_disk(found.vmid, spec, &found.config, progress)?;
        timings.mark("configure");
        Ok(true)
    }

    fn start(&self, name: &str, progress: &dyn Reporter) -> Result<()> {
        let (found, _) = self.managed(name)?;
        self.start_vm(found.vmid, name, progress)
    }

    fn is_running(&self, name: &str) -> Result<bool> {
        let (found, _) = self.managed(name)?;
        let current = self
            .client
            .get(&self.vm_path(found.vmid, "/status/current"), &[])
            .map_err(pve)?;
        Ok(current["status"] == "running")
    }

    fn wait_ssh(&self, name: &str, deadline: Instant) -> Result<()> {
        let (found, _) = self.managed(name)?;
        // The guest's address comes from its agent, which answers 500 until it runs.
        let ip = loop {
            match self.guest_ip(found.vmid) {
                Ok(Some(ip)) => break ip,
                Ok(None) | Err(_) if Instant::now() < deadline => std::thread::sleep(POLL),
                Ok(None) => {
                    return Err(anyhow!("{name}: the guest reports no routable address").into());
                }
                Err(e) => {
                    return Err(anyhow!("{name}: no address from the guest agent: {e}").into());
                }
            }
        };
        let addr = SocketAddr::new(ip, self.spec.ssh_port);
        while crate::ssh::read_banner(&addr).is_none() {
            if Instant::now() >= deadline {
                return Err(anyhow!("{name}: no SSH banner on {addr} in time").into());
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    fn acpi_shutdown(&self, name: &str) -> Result<()> {
        let (found, _) = self.managed(name)?;
        // A task that ends when the guest is off; the orchestration watches the state.
        self.client
            .post(&self.vm_path(found.vmid, "/status/shutdown"), &[])
            .map_err(pve)?;
        Ok(())
    }

    fn force_off(&self, name: &str) -> Result<()> {
        let (found, _) = self.managed(name)?;
        let upid = self
            .client
            .post(&self.vm_path(found.vmid, "/status/stop"), &[])
            .map_err(pve)?;
        self.client.wait_task(&upid, "stop", &Silent, name)?;
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<()> {
        let (found, _) = self.managed(name)?;
        if found.running {
            self.force_off(name)?;
        }
        self.purge(found.vmid, &Silent, name)?;
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
                if found.running {
                    match self.guest_ip(found.vmid) {
                        Ok(ip) => {
                            status.agent = AgentState::Ready;
                            status.ips = ip.map(|i| i.to_string()).into_iter().collect();
                        }
                        Err(_) => status.agent = AgentState::NotResponding,
                    }
                }
                Ok(status)
            }
            None => Ok(VmStatus::absent(name, &self.name, spec)),
        }
    }

    fn list(&self, specs: &[VmSpec]) -> Result<Vec<VmStatus>> {
        let mut out = Vec::new();
        for r in self.resources()? {
            let in_pool = self.spec.pool.as_deref().is_some_and(|p| r["pool"] == p);
            if r["template"] == 1 || r["node"] != self.spec.node.as_str() {
                continue;
            }
            let Some(name) = r["name"].as_str() else {
                continue;
            };
            // The resource list is already in hand: only the config is fetched.
            let found = self.found(&r)?;
            if found.marker.is_some() || in_pool {
                let spec = specs.iter().find(|s| s.name.as_str() == name);
                out.push(self.status_of(name, &found, spec));
            }
        }
        Ok(out)
    }

    fn states(&self) -> Result<Vec<(String, State)>> {
        Ok(self
            .list(&[])?
            .into_iter()
            .map(|s| (s.name, s.state))
            .collect())
    }

    fn plan(&self, spec: &VmSpec, _image: Option<&ImageSpec>) -> Result<Plan> {
        let name = spec.name.as_str();
        let hash = self.spec_hash(spec);
        let mut plan = Plan {
            name: name.to_string(),
            backend: self.name.clone(),
            ..Plan::default()
        };
        let desired = self.desired_config(spec, &hash);
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
                plan.create = true;
                plan.changes.push(Change {
                    key: "clone".into(),
                    old: None,
                    new: format!(
                        "template {} ({} clone)",
                        match &self.spec.template {
                            TemplateRef::Id(id) => id.to_string(),
                            TemplateRef::Name(n) => n.clone(),
                        },
                        if self.spec.full_clone {
                            "full"
                        } else {
                            "linked"
                        }
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
        let ip = self
            .guest_ip(found.vmid)
            .map_err(pve)?
            .ok_or_else(|| anyhow!("{name}: the guest reports no address (is it running?)"))?;
        let dir = self.known_hosts_dir(name);
        crate::fsutil::create_private_dir(&dir)?;
        Ok(Endpoint {
            vm: name.to_string(),
            host: ip.to_string(),
            port: self.spec.ssh_port,
            user: marker.user,
            identity: self.identity.private_key.clone(),
            known_hosts: dir.join(crate::paths::VM_KNOWN_HOSTS_FILE),
            strict: false,
        })
    }
}
