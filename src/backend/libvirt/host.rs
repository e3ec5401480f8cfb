//! What the local host and its libvirt can do: KVM or TCG, passt or SLIRP.

use anyhow::{Context, Result, bail};
use nix::unistd::{AccessFlags, access};
use serde::Deserialize;
use virt::connect::Connect;

use crate::domain::{Accel, NetworkMode};
use crate::paths::{ENV_ACCEL, ENV_NETWORK, non_empty_env};
use crate::spec::Accel as Requested;

pub const KVM_DEVICE: &str = "/dev/kvm";
pub const PASST_BINARY: &str = "passt";

/// The accelerator for a VM: `AGENTVM_ACCEL` wins over the spec; `auto` picks
/// KVM only when the caller can open /dev/kvm and libvirt offers it.
pub fn accel(conn: &Connect, requested: Requested) -> Result<Accel> {
    let requested = match non_empty_env(ENV_ACCEL) {
        Some(text) => text
            .parse::<Requested>()
            .map_err(|e| anyhow::anyhow!("{ENV_ACCEL}: {e}"))?,
        None => requested,
    };
    match requested {
        Requested::Tcg => Ok(Accel::Tcg),
        Requested::Kvm => {
            if let Some(why) = kvm_unusable(conn)? {
                bail!("accel = \"kvm\" was asked for, but {why}; use accel = \"auto\" or \"tcg\"");
            }
            Ok(Accel::Kvm)
        }
        Requested::Auto => Ok(match kvm_unusable(conn)? {
            None => Accel::Kvm,
            Some(why) => {
                tracing::debug!("using TCG: {why}");
                Accel::Tcg
            }
        }),
    }
}

/// Why KVM cannot be used on this connection, or `None` when it can.
pub fn kvm_unusable(conn: &Connect) -> Result<Option<String>> {
    if let Some(why) = kvm_device_unusable() {
        return Ok(Some(why));
    }
    let caps = conn
        .capabilities()
        .map_err(super::lv)
        .context("reading libvirt capabilities")?;
    if libvirt_offers_kvm(&caps) {
        Ok(None)
    } else {
        Ok(Some("libvirt does not offer KVM for x86_64 guests".into()))
    }
}

/// Why this user cannot use /dev/kvm, or `None` when they can open it.
pub fn kvm_device_unusable() -> Option<String> {
    if access(KVM_DEVICE, AccessFlags::R_OK | AccessFlags::W_OK).is_err() {
        return Some(format!(
            "{KVM_DEVICE} is missing or not usable by this user"
        ));
    }
    None
}

#[derive(Deserialize)]
struct Capabilities {
    #[serde(default)]
    guest: Vec<CapsGuest>,
}

#[derive(Deserialize)]
struct CapsGuest {
    arch: CapsArch,
}

#[derive(Deserialize)]
struct CapsArch {
    #[serde(rename = "@name")]
    name: String,
    #[serde(default)]
    domain: Vec<CapsDomain>,
}

#[derive(Deserialize)]
struct CapsDomain {
    #[serde(rename = "@type")]
    kind: String,
}

pub fn libvirt_offers_kvm(capabilities_xml: &str) -> bool {
    quick_xml::de::from_str::<Capabilities>(capabilities_xml).is_ok_and(|caps| {
        caps.guest
            .iter()
            .any(|g| g.arch.name == "x86_64" && g.arch.domain.iter().any(|d| d.kind == "kvm"))
    })
}

/// passt when libvirt's domain capabilities list it as an interface backend and
/// the passt binary is installed; SLIRP otherwise. `AGENTVM_NETWORK` overrides.
pub fn network(conn: &Connect, accel: Accel) -> Result<NetworkMode> {
    if let Some(forced) = non_empty_env(ENV_NETWORK) {
        return match forced.as_str() {
            "passt" => Ok(NetworkMode::Passt),
            "slirp" => Ok(NetworkMode::Slirp),
            other => bail!("{ENV_NETWORK}={other:?}: expected passt or slirp"),
        };
    }
    let virttype = match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "qemu",
    };
    let domcaps = conn
        .domain_capabilities(None, Some("x86_64"), Some("q35"), Some(virttype), 0)
        .map_err(super::lv)
        .context("reading libvirt domain capabilities")?;
    if domcaps_offer_passt(&domcaps) && binary_on_path(PASST_BINARY) {
        Ok(NetworkMode::Passt)
    } else {
        Ok(NetworkMode::Slirp)
    }
}

#[derive(Deserialize)]
struct DomainCaps {
    devices: Option<DomCapsDevices>,
}

#[derive(Deserialize)]
struct DomCapsDevices {
    interface: Option<DomCapsEnums>,
}

#[derive(Deserialize)]
struct DomCapsEnums {
    #[serde(default, rename = "enum")]
    enums: Vec<DomCapsEnum>,
}

#[derive(Deserialize)]
struct DomCapsEnum {
    #[serde(rename = "@name")]
    name: String,
    #[serde(default)]
    value: Vec<String>,
}

pub fn domcaps_offer_passt(domcaps_xml: &str) -> bool {
    quick_xml::de::from_str::<DomainCaps>(domcaps_xml).is_ok_and(|caps| {
        caps.devices.and_then(|d| d.interface).is_some_and(|i| {
            i.enums
                .iter()
                .any(|e| e.name == "backendType" && e.value.iter().any(|v| v == "passt"))
        })
    })
}

fn binary_on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kvm_from_capabilities() {
        let with = "<capabilities><host/><guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/><domain type='kvm'/></arch></guest></capabilities>";
        let without = "<capabilities><host/><guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/></arch></guest><guest><arch name='i686'><domain type='kvm'/></arch></guest></capabilities>";
        assert!(libvirt_offers_kvm(with));
        assert!(!libvirt_offers_kvm(without));
    }

    #[test]
    fn reads_passt_from_domain_capabilities() {
        let with = "<domainCapabilities><path>/usr/bin/qemu</path><devices><disk supported='yes'/><interface supported='yes'><enum name='backendType'><value>default</value><value>passt</value></enum></interface></devices></domainCapabilities>";
        let old = "<domainCapabilities><devices><disk supported='yes'/><graphics supported='yes'/></devices></domainCapabilities>";
        assert!(domcaps_offer_passt(with));
        assert!(!domcaps_offer_passt(old));
    }
}
