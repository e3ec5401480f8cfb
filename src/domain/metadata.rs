//! What agentvm stores in a domain's `<metadata>`: libvirt is the state store
//! for local VMs, so everything needed to manage a VM again lives here.

use serde::{Deserialize, Serialize};

use super::{Accel, NetworkMode};
use crate::spec::{DEFAULT_HOST_KEY, Egress, EgressRule, Forward, VmSpec};

const EGRESS_NONE: &str = "none";
const EGRESS_ALLOW: &str = "allow";

/// The agentvm XML namespace for domain metadata.
pub const AGENTVM_NS: &str = "https://agentvm.dev/xmlns/vm/1";
/// Domain names are this prefix plus the VM name.
pub const DOMAIN_PREFIX: &str = "agentvm-";

pub fn domain_name(vm: &str) -> String {
    format!("{DOMAIN_PREFIX}{vm}")
}

/// [`VmState::boot`]: the image's kernel and initrd, booted directly.
pub const BOOT_DIRECT: &str = "direct";
/// [`VmState::boot`]: through the disk's own bootloader.
pub const BOOT_DISK: &str = "disk";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    #[serde(rename = "@xmlns:agentvm", default = "agentvm_ns")]
    pub xmlns: String,
    #[serde(rename = "agentvm:name", alias = "name")]
    pub name: String,
    #[serde(rename = "agentvm:backend", alias = "backend")]
    pub backend: String,
    /// The canonical path of the agentvm home (`$AGENTVM_HOME`) that made the
    /// VM: homes share the user's libvirt session, each sees only its own VMs.
    #[serde(
        rename = "agentvm:home",
        alias = "home",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub home: Option<String>,
    #[serde(rename = "agentvm:spec-hash", alias = "spec-hash")]
    pub spec_hash: String,
    #[serde(rename = "agentvm:image", alias = "image")]
    pub image: String,
    #[serde(rename = "agentvm:image-digest", alias = "image-digest")]
    pub image_digest: String,
    #[serde(rename = "agentvm:ssh-port", alias = "ssh-port")]
    pub ssh_port: u16,
    #[serde(rename = "agentvm:spice-port", alias = "spice-port")]
    pub spice_port: u16,
    #[serde(rename = "agentvm:user", alias = "user")]
    pub user: String,
    #[serde(rename = "agentvm:readonly", alias = "readonly")]
    pub readonly: bool,
    #[serde(rename = "agentvm:accel", alias = "accel")]
    pub accel: String,
    #[serde(rename = "agentvm:network", alias = "network")]
    pub network: String,
    /// The image runs qemu-guest-agent.
    #[serde(rename = "agentvm:agent", alias = "agent", default = "yes")]
    pub agent: bool,
    /// The guest path of the SSH host public key.
    #[serde(
        rename = "agentvm:host-key",
        alias = "host-key",
        default = "default_host_key"
    )]
    pub host_key: String,
    #[serde(
        rename = "agentvm:purpose",
        alias = "purpose",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub purpose: Option<String>,
    /// The VM's port forwards: its spec's, as the domain was defined with them,
    /// and `live` ones `agentvm forward` added to the running VM (dropped at
    /// its next start).
    #[serde(rename = "agentvm:forward", alias = "forward", default)]
    pub forwards: Vec<ForwardState>,
    /// The VM's shared folders, in mount-tag order.
    #[serde(rename = "agentvm:share", alias = "share", default)]
    pub shares: Vec<super::share::ShareState>,
    /// The egress policy the domain was defined with: absent for `open`,
    /// `none`, or `allow` with the entries in `egress-allow`.
    #[serde(
        rename = "agentvm:egress",
        alias = "egress",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub egress: Option<String>,
    #[serde(rename = "agentvm:egress-allow", alias = "egress-allow", default)]
    pub egress_allow: Vec<String>,
    /// The file name (in the VM's folder) of the disk's writable top when it
    /// is not `disk.qcow2`: a forked VM writes to a new top.
    #[serde(
        rename = "agentvm:disk",
        alias = "disk",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub disk: Option<String>,
    /// The read-only layers (absolute paths, bottom first) forks froze under
    /// the disk: a VM sits on every layer of its chain, so the VM whose
    /// folder holds one cannot be destroyed while another VM sits on it.
    #[serde(rename = "agentvm:layer", alias = "layer", default)]
    pub layers: Vec<String>,
    /// How a VM whose image has its own kernel and a bootable disk (a NixOS
    /// image agentvm built) boots: [`BOOT_DIRECT`] (the image's kernel,
    /// no bootloader) while its system is the image's, [`BOOT_DISK`] (its
    /// bootloader) once the system was changed in the guest. Absent for
    /// other images.
    #[serde(
        rename = "agentvm:boot",
        alias = "boot",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot: Option<String>,
    /// The VM this one was forked from.
    #[serde(
        rename = "agentvm:forked-from",
        alias = "forked-from",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub forked_from: Option<String>,
}

/// One port forward as the domain metadata holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardState {
    #[serde(rename = "@host-addr")]
    pub host_addr: std::net::IpAddr,
    #[serde(rename = "@host-port")]
    pub host_port: u16,
    #[serde(rename = "@guest-port")]
    pub guest_port: u16,
    /// Added to the running VM by `agentvm forward`, not in its definition.
    #[serde(rename = "@live", default, skip_serializing_if = "is_false")]
    pub live: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ForwardState {
    pub fn forward(&self) -> Forward {
        Forward {
            host_addr: self.host_addr,
            host_port: self.host_port,
            guest_port: self.guest_port,
        }
    }
}

impl From<&Forward> for ForwardState {
    fn from(f: &Forward) -> Self {
        Self {
            host_addr: f.host_addr,
            host_port: f.host_port,
            guest_port: f.guest_port,
            live: false,
        }
    }
}

impl VmState {
    /// The state of a VM made from `spec` on `image_digest` with the given ports
    /// (ssh, spice), accelerator and network.
    pub fn new(
        spec: &VmSpec,
        image_digest: &str,
        spec_hash: String,
        (ssh_port, spice_port): (u16, u16),
        accel: Accel,
        network: NetworkMode,
    ) -> Self {
        Self {
            xmlns: AGENTVM_NS.to_string(),
            name: spec.name.to_string(),
            backend: spec.backend.clone(),
            home: None,
            spec_hash,
            image: spec
                .image
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            image_digest: image_digest.to_string(),
            ssh_port,
            spice_port,
            user: spec.user.clone(),
            readonly: spec.readonly,
            accel: accel.as_str().to_string(),
            network: network.as_str().to_string(),
            agent: true,
            host_key: DEFAULT_HOST_KEY.to_string(),
            purpose: spec.purpose.clone(),
            forwards: spec.forwards.iter().map(ForwardState::from).collect(),
            shares: spec
                .shares
                .iter()
                .map(super::share::ShareState::from)
                .collect(),
            egress: match &spec.egress {
                Egress::Open => None,
                Egress::None => Some(EGRESS_NONE.to_string()),
                Egress::Allow(_) => Some(EGRESS_ALLOW.to_string()),
            },
            egress_allow: spec
                .egress
                .rules()
                .iter()
                .map(ToString::to_string)
                .collect(),
            disk: None,
            layers: Vec::new(),
            boot: None,
            forked_from: None,
        }
    }

    /// The egress policy the domain was defined with. An entry that no longer
    /// parses is left out (and so refused), never admitted.
    pub fn egress(&self) -> Egress {
        match self.egress.as_deref() {
            None => Egress::Open,
            Some(EGRESS_ALLOW) => Egress::Allow(
                self.egress_allow
                    .iter()
                    .filter_map(|e| EgressRule::parse(e).ok())
                    .collect(),
            ),
            // `none`, and anything this build does not know: the strictest.
            Some(_) => Egress::None,
        }
    }
}

fn yes() -> bool {
    true
}

fn default_host_key() -> String {
    DEFAULT_HOST_KEY.to_string()
}

fn agentvm_ns() -> String {
    AGENTVM_NS.to_string()
}
