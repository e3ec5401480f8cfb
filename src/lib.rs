//! agentvm: per-user agent VMs on libvirt and Proxmox VE from one fleet file. See ARCHITECTURE.md.

pub mod backend;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod clock;
pub mod daemon;
pub mod domain;
pub mod egress_proxy;
pub mod failpoint;
pub mod fsutil;
pub mod guest;
pub mod image;
pub mod init;
pub mod nocloud;
pub mod paths;
pub mod ports;
pub mod progress;
pub mod protocol;
pub mod provision;
pub mod scaffold;
pub mod screenshot;
pub mod secrets;
pub mod serde_b64;
pub mod spec;
pub mod ssh;
pub mod virtiofsd;
