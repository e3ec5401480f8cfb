//! The Proxmox backend's guest agent (through the API's `agent/*` calls), and
//! the capabilities it does not offer yet, each the typed unsupported error.

use std::time::Instant;

use anyhow::anyhow;

use super::{POLL, ProxmoxBackend, PveError, pve};
use crate::backend::{Display, GuestAgent, Result, Snapshots};

impl GuestAgent for ProxmoxBackend {
    /// agentvm sets `agent: 1` on every VM it makes.
    fn agent_expected(&self, _name: &str) -> Result<bool> {
        Ok(true)
    }

    fn wait_agent(&self, name: &str, deadline: Instant) -> Result<()> {
        let (found, _) = self.managed(name)?;
        // The agent answers 500 "not running" until the guest has booted it.
        loop {
            match self
                .client
                .post(&self.vm_path(found.vmid, "/agent/ping"), &[])
            {
                Ok(_) => return Ok(()),
                Err(PveError::Api { message, .. })
                    if Instant::now() < deadline && message.contains("not running") =>
                {
                    std::thread::sleep(POLL);
                }
                Err(e) => {
                    return Err(anyhow!("{name}: the guest agent did not answer: {e}").into());
                }
            }
        }
    }

    fn agent_shutdown(&self, name: &str) -> Result<()> {
        let (found, _) = self.managed(name)?;
        self.client
            .post(&self.vm_path(found.vmid, "/agent/shutdown"), &[])
            .map_err(pve)?;
        Ok(())
    }
}

impl Snapshots for ProxmoxBackend {}

impl Display for ProxmoxBackend {}
