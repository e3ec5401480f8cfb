//! What agentvm stores in a domain's `<metadata>`: libvirt is the state store
//! for local VMs, so everything needed to manage a VM again lives here.

use serde::{Deserialize, Serialize};

/// The agentvm XML namespace for domain metadata.
pub const AGENTVM_NS: &str = "https://agentvm.dev/xmlns/vm/1";
/// Domain names are this prefix plus the VM name.
pub const DOMAIN_PREFIX: &str = "agentvm-";

pub fn domain_name(vm: &str) -> String {
    format!("{DOMAIN_PREFIX}{vm}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    #[serde(rename = "@xmlns:agentvm", default = "agentvm_ns")]
    pub xmlns: String,
    #[serde(rename = "agentvm:name", alias = "name")]
    pub name: String,
    #[serde(rename = "agentvm:backend", alias = "backend")]
    pub backend: String,
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
    #[serde(
        rename = "agentvm:purpose",
        alias = "purpose",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub purpose: Option<String>,
}

fn agentvm_ns() -> String {
    AGENTVM_NS.to_string()
}
