//! agentvm: per-user agent VMs on libvirt (and, later, Proxmox VE) from one fleet file.

pub mod fsutil;
pub mod paths;
pub mod domain;
pub mod spec;
