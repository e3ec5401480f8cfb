//! Port forwards of a running local VM: HMP `hostfwd_add`/`hostfwd_remove` on
//! its SLIRP netdev, recorded as `live` in the domain metadata. A live forward
//! lasts until the VM stops: its next start drops it and says so.

use anyhow::{Context, anyhow};
use qapi::qmp;
use virt::domain::Domain;
use virt::sys;

use super::{LocalBackend, lv};
use crate::backend::{ForwardChange, ForwardStatus, Forwards, Result};
use crate::domain::metadata::ForwardState;
use crate::domain::{self, AGENTVM_NS, NetworkMode, VmState};
use crate::fsutil::FileLock;
use crate::guest::Guest;
use crate::paths;
use crate::ports;
use crate::progress::Reporter;
use crate::spec::Forward;

impl Forwards for LocalBackend {
    fn forward(&self, name: &str, change: &ForwardChange) -> Result<Vec<ForwardStatus>> {
        match change {
            ForwardChange::List => {
                let (dom, state) = self.require(name)?;
                // A stopped VM's live forwards went with its QEMU.
                let running = dom.is_active().map_err(lv).context("asking libvirt")?;
                Ok(statuses(&state)
                    .into_iter()
                    .filter(|f| running || !f.live)
                    .collect())
            }
            ForwardChange::Add { forward } => {
                // Held from checking the port until the metadata claims it.
                let _ports = FileLock::acquire(&paths::lock_file()?)?;
                let (dom, mut state) = self.require_running(name)?;
                slirp_only(name, &state)?;
                let taken_by_self = if forward.host_port == state.ssh_port {
                    Some("its SSH port".to_string())
                } else if forward.host_port == state.spice_port {
                    Some("its SPICE port".to_string())
                } else {
                    state
                        .forwards
                        .iter()
                        .find(|f| f.host_port == forward.host_port)
                        .map(|f| format!("already forwarded to guest port {}", f.guest_port))
                };
                if let Some(why) = taken_by_self {
                    return Err(anyhow!(
                        "{name}: forward {forward}: host port {} is {why} on this VM",
                        forward.host_port
                    )
                    .into());
                }
                ports::check_forward(name, forward, &self.claims(name)?)
                    .map_err(|e| anyhow!("{name}: {e}"))?;
                let reply = hmp(
                    &dom,
                    &format!("hostfwd_add {} {}", domain::SLIRP_NETDEV, forward.hostfwd()),
                )?;
                if !reply.trim().is_empty() {
                    return Err(anyhow!(
                        "{name}: QEMU refused forward {forward}: {}",
                        reply.trim()
                    )
                    .into());
                }
                state.forwards.push(ForwardState {
                    live: true,
                    ..ForwardState::from(forward)
                });
                if let Err(e) = write_state(&dom, &state) {
                    // Unrecorded, no other VM would see the port as taken: undo it.
                    let _ = hmp(&dom, &remove_command(forward));
                    return Err(e);
                }
                Ok(statuses(&state))
            }
            ForwardChange::Remove { host_port } => {
                let (dom, mut state) = self.require_running(name)?;
                slirp_only(name, &state)?;
                let at = state
                    .forwards
                    .iter()
                    .position(|f| f.host_port == *host_port)
                    .ok_or_else(|| anyhow!("{name} has no forward on host port {host_port}"))?;
                if !state.forwards[at].live {
                    return Err(anyhow!(
                        "{name}: host port {host_port} is forwarded by its spec; remove it from forwards in agentvm.toml (it goes at the next restart)"
                    )
                    .into());
                }
                let forward = state.forwards[at].forward();
                let reply = hmp(&dom, &remove_command(&forward))?;
                if !reply.contains("removed") {
                    return Err(anyhow!(
                        "{name}: QEMU did not remove forward {forward}: {}",
                        reply.trim()
                    )
                    .into());
                }
                state.forwards.remove(at);
                write_state(&dom, &state)?;
                Ok(statuses(&state))
            }
        }
    }
}

impl LocalBackend {
    /// Takes the live forwards out of a stopped VM's metadata before its start
    /// (its definition never had them), saying which are dropped.
    pub(super) fn drop_live_forwards(
        &self,
        dom: &Domain,
        state: &VmState,
        progress: &dyn Reporter,
    ) -> Result<()> {
        let dropped: Vec<Forward> = live_forwards(state);
        if dropped.is_empty() {
            return Ok(());
        }
        let mut kept = state.clone();
        kept.forwards.retain(|f| !f.live);
        write_state(dom, &kept)?;
        say_dropped(&state.name, &dropped, progress);
        Ok(())
    }
}

/// The live forwards of `state`, which a start or a redefinition drops.
pub(super) fn live_forwards(state: &VmState) -> Vec<Forward> {
    state
        .forwards
        .iter()
        .filter(|f| f.live)
        .map(ForwardState::forward)
        .collect()
}

pub(super) fn say_dropped(name: &str, dropped: &[Forward], progress: &dyn Reporter) {
    if dropped.is_empty() {
        return;
    }
    let list: Vec<String> = dropped.iter().map(ToString::to_string).collect();
    progress.step(
        name,
        &format!(
            "live forwards dropped at this start: {} (add them to forwards in agentvm.toml to keep them)",
            list.join(", ")
        ),
    );
}

fn statuses(state: &VmState) -> Vec<ForwardStatus> {
    state
        .forwards
        .iter()
        .map(|f| ForwardStatus::new(&f.forward(), f.live))
        .collect()
}

fn slirp_only(name: &str, state: &VmState) -> Result<()> {
    if state.network != NetworkMode::Slirp.as_str() {
        return Err(anyhow!(
            "{name} uses {}: forwards of a running VM can only change on SLIRP; add it to forwards in agentvm.toml and restart the VM",
            state.network
        )
        .into());
    }
    Ok(())
}

fn remove_command(forward: &Forward) -> String {
    format!(
        "hostfwd_remove {} tcp:{}:{}",
        domain::SLIRP_NETDEV,
        forward.hostfwd_addr(),
        forward.host_port
    )
}

/// Runs an HMP command through QMP `human-monitor-command`; HMP reports
/// errors as its output text, which the caller reads.
fn hmp(dom: &Domain, command: &str) -> Result<String> {
    Ok(Guest::new(dom)
        .monitor(qmp::human_monitor_command {
            command_line: command.to_string(),
            cpu_index: None,
        })
        .map_err(|e| anyhow!("{command}: {e}"))?)
}

/// Replaces the domain's agentvm metadata, live and in its definition.
pub(super) fn write_state(dom: &Domain, state: &VmState) -> Result<()> {
    let xml =
        quick_xml::se::to_string_with_root("vm", state).context("writing agentvm metadata")?;
    let xml = unprefixed(&xml);
    let live = dom.is_active().map_err(lv).context("asking libvirt")?;
    let flags = if live {
        sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG
    } else {
        sys::VIR_DOMAIN_AFFECT_CONFIG
    };
    dom.set_metadata(
        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(&xml),
        Some("agentvm"),
        Some(AGENTVM_NS),
        flags,
    )
    .map_err(lv)
    .context("recording forwards in the domain metadata")?;
    Ok(())
}

/// The metadata element without its namespace: libvirt puts its root in the
/// agentvm namespace itself (and refuses an element that declares it), and
/// [`VmState`] reads unprefixed children as well. Text and attribute values
/// are escaped, so no `<` in them is touched.
fn unprefixed(xml: &str) -> String {
    xml.replacen(&format!(" xmlns:agentvm=\"{AGENTVM_NS}\""), "", 1)
        .replace("<agentvm:", "<")
        .replace("</agentvm:", "</")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_for_libvirt_has_no_namespace_and_reads_back() {
        let mut state = crate::domain::tests::sample_state("drago");
        state.purpose = Some("a <agentvm:purpose> & more".into());
        state.forwards.push(ForwardState {
            live: true,
            ..ForwardState::from(&"0.0.0.0:8080:80".parse::<Forward>().unwrap())
        });
        let xml = unprefixed(&quick_xml::se::to_string_with_root("vm", &state).unwrap());
        assert!(
            !xml.contains("<agentvm:") && !xml.contains("xmlns"),
            "{xml}"
        );
        assert!(
            xml.contains(
                r#"<forward host-addr="0.0.0.0" host-port="8080" guest-port="80" live="true"/>"#
            ),
            "{xml}"
        );
        // As libvirt hands it back: the root in the namespace, children not.
        let back = xml
            .replacen(
                "<vm>",
                &format!("<agentvm:vm xmlns:agentvm=\"{AGENTVM_NS}\">"),
                1,
            )
            .replace("</vm>", "</agentvm:vm>");
        let read: VmState = quick_xml::de::from_str(&back).unwrap();
        assert_eq!(read, state);
    }
}
