//! Which backends there are and which one a VM lives on. The local backend is
//! always there; each `[backends.NAME]` of the fleet file a request brings is
//! built on first use and rebuilt when its settings change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use serde::{Deserialize, Serialize};

use super::libvirt::Healing;
use super::proxmox::ProxmoxBackend;
use super::{Backend, BackendError, Existing, Result};
use crate::paths::Home;
use crate::progress::Reporter;
use crate::spec::{BackendSpec, LOCAL_BACKEND, VmSpec};

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// A `[backends.NAME]` table with its token read (by the CLI, whose
/// environment and files name it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteConfig {
    pub spec: BackendSpec,
    pub token: Secret,
}

/// A remote backend and the settings it was built from.
type Built = (RemoteConfig, Arc<dyn Backend>);

/// Every backend the daemon has built.
pub struct Registry {
    local: Arc<Healing>,
    home: Home,
    remote: Mutex<BTreeMap<String, Built>>,
}

impl Registry {
    pub fn new(local: Arc<Healing>, home: Home) -> Self {
        Self {
            local,
            home,
            remote: Mutex::default(),
        }
    }

    pub fn local(&self) -> &Arc<Healing> {
        &self.local
    }

    /// The backends a request works with: local plus those of its fleet file.
    pub fn view(&self, configs: &[RemoteConfig]) -> anyhow::Result<Backends> {
        let mut entries: Vec<(String, Arc<dyn Backend>)> =
            vec![(LOCAL_BACKEND.to_string(), self.local.clone())];
        let mut remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        for config in configs {
            let name = config.spec.name.to_string();
            let backend = match remote.get(&name) {
                Some((known, backend)) if known == config => backend.clone(),
                _ => {
                    let backend: Arc<dyn Backend> = Arc::new(ProxmoxBackend::connect(
                        &name,
                        &config.spec.proxmox,
                        config.token.expose(),
                        self.home.clone(),
                    )?);
                    remote.insert(name.clone(), (config.clone(), backend.clone()));
                    backend
                }
            };
            entries.push((name, backend));
        }
        Ok(Backends { entries })
    }

    /// Every backend built so far (for the lifecycle watcher).
    pub fn all(&self) -> Backends {
        let mut entries: Vec<(String, Arc<dyn Backend>)> =
            vec![(LOCAL_BACKEND.to_string(), self.local.clone())];
        let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        entries.extend(remote.iter().map(|(n, (_, b))| (n.clone(), b.clone())));
        Backends { entries }
    }
}

/// The backends of one request, by name.
#[derive(Clone)]
pub struct Backends {
    entries: Vec<(String, Arc<dyn Backend>)>,
}

/// Where a VM lives (or, when it exists nowhere yet, will live).
pub struct Located {
    pub backend_name: String,
    pub backend: Arc<dyn Backend>,
    pub existing: Option<Existing>,
}

impl Backends {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<dyn Backend>)> {
        self.entries.iter().map(|(n, b)| (n.as_str(), b))
    }

    pub fn get(&self, name: &str) -> Result<Arc<dyn Backend>> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.clone())
            .ok_or_else(|| {
                anyhow!(
                    "no backend named {name:?} (available: {}): add [backends.{name}] to agentvm.toml",
                    self.entries
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
                .into()
            })
    }

    /// The backend `vm` lives on: the one that has it. A VM on two backends is
    /// an error naming both. A VM nowhere yet belongs where `requested` (`up
    /// --backend`) or its spec says. `requested` naming another backend than the
    /// one the VM is on is an error.
    pub fn locate(
        &self,
        vm: &str,
        spec: Option<&VmSpec>,
        requested: Option<&str>,
        progress: &dyn Reporter,
    ) -> Result<Located> {
        let target = requested
            .or(spec.map(|s| s.backend.as_str()))
            .unwrap_or(LOCAL_BACKEND)
            .to_string();
        let target_backend = self.get(&target)?;
        let mut found = Vec::new();
        let mut unanswered = Vec::new();
        for (name, backend) in self.iter() {
            match backend.find(vm) {
                Ok(Some(existing)) => found.push((name.to_string(), backend.clone(), existing)),
                Ok(None) => {}
                Err(e) if name == target => return Err(e),
                Err(e) => unanswered.push((name.to_string(), e)),
            }
        }
        match found.len() {
            0 => {
                for (name, e) in &unanswered {
                    progress.step(
                        vm,
                        &format!(
                            "backend {name} did not answer ({e}); {vm} is not looked for there"
                        ),
                    );
                }
                Ok(Located {
                    backend_name: target,
                    backend: target_backend,
                    existing: None,
                })
            }
            1 => {
                let (name, backend, existing) = found.remove(0);
                if let Some(asked) = requested
                    && asked != name
                {
                    return Err(anyhow!(
                        "{vm} already exists on backend {name}, not {asked}: drop --backend, or `agentvm destroy {vm}` first"
                    )
                    .into());
                }
                Ok(Located {
                    backend_name: name,
                    backend,
                    existing: Some(existing),
                })
            }
            _ => Err(BackendError::Other(anyhow!(
                "{vm} exists on more than one backend ({}): remove it from all but one by hand",
                found
                    .iter()
                    .map(|(n, _, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(" and ")
            ))),
        }
    }
}
