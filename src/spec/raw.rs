//! The fleet file as written: serde structs that mirror `agentvm.toml` exactly.
//! Everything here is checked for shape and type; `super::resolve` checks meaning.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::size::Size;

/// Accelerator choice: `auto` uses KVM only when the caller can use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!(
                "unknown accel {other:?}: expected auto, kvm or tcg"
            )),
        }
    }
}

/// A number of virtual CPUs, 1 to 256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpus(pub u32);

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if (1..=256).contains(&n) {
            Ok(Cpus(n as u32))
        } else {
            Err(serde::de::Error::custom(format!(
                "invalid cpus {n}: expected 1 to 256"
            )))
        }
    }
}

/// A host TCP port agentvm may listen on: 1024 to 65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if (1024..=65535).contains(&n) {
            Ok(Port(n as u16))
        } else {
            Err(serde::de::Error::custom(format!(
                "invalid port {n}: expected 1024 to 65535"
            )))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub images: BTreeMap<String, RawImage>,
    #[serde(default)]
    pub vms: BTreeMap<String, RawVm>,
    #[serde(default)]
    pub backends: BTreeMap<String, RawBackend>,
}

/// `[backends.NAME]`: a remote place to run VMs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub kind: Spanned<String>,
    pub endpoint: Spanned<String>,
    pub node: String,
    pub token: RawToken,
    /// The template VMs are cloned from when their image was not pushed
    /// (`agentvm image push`).
    pub template: Option<RawTemplate>,
    pub storage: Option<String>,
    /// The storage (with `import` content) `image push` uploads images to.
    pub import_storage: Option<String>,
    /// The bridge of the network card of pushed templates (default `vmbr0`).
    pub bridge: Option<String>,
    pub pool: Option<String>,
    #[serde(default)]
    pub full_clone: bool,
    pub fingerprint: Option<Spanned<String>>,
    #[serde(default)]
    pub insecure: bool,
    pub tls: Option<RawTls>,
    /// The port the guests' SSH listens on (default 22).
    pub ssh_port: Option<u16>,
}

/// Where an API token comes from: `{ env = "VAR" }` or `{ file = "path" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    pub env: Option<String>,
    pub file: Option<String>,
}

/// `tls = { fingerprint = "AA:BB:…" }` or `tls = { insecure = true }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub fingerprint: Option<Spanned<String>>,
    #[serde(default)]
    pub insecure: bool,
}

/// A template by VMID or by name.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawTemplate {
    Id(u32),
    Name(String),
}

/// `[defaults]`: every key here may also be set per VM.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub cpus: Option<Cpus>,
    pub memory: Option<Size>,
    pub disk: Option<Size>,
    pub image: Option<Spanned<String>>,
    pub backend: Option<Spanned<String>>,
    pub ssh_keys: Option<Spanned<Vec<String>>>,
    pub accel: Option<Accel>,
    /// Host environment variables copied into each VM's env at `up`.
    pub pass_env: Option<Spanned<Vec<String>>>,
    /// Host ports forwarded into each local VM (a VM's own list replaces it).
    pub forwards: Option<Spanned<Vec<String>>>,
    /// Host folders shared with each local VM (a VM's own list replaces it).
    pub shares: Option<Spanned<Vec<RawShare>>>,
    /// What each VM may reach (a VM's own value replaces it).
    pub egress: Option<Spanned<RawEgress>>,
}

/// One entry of `shares`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShare {
    pub host: String,
    pub guest: String,
    #[serde(default)]
    pub readonly: bool,
    #[serde(rename = "type", default)]
    pub kind: super::ShareKind,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// `[images.NAME]`: one of `file`, `flake`, or `kernel` (+ `initrd`, `cmdline`, optional `file`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImage {
    pub file: Option<String>,
    pub flake: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    /// Whether the image runs qemu-guest-agent (default true).
    pub agent: Option<bool>,
    /// The guest path of the SSH host public key.
    pub host_key: Option<String>,
    /// A stock cloud image: give it a NoCloud seed disk.
    #[serde(default)]
    pub cloud_init: bool,
}

/// `[vms.NAME]`: the `[defaults]` keys plus the VM's own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVm {
    pub cpus: Option<Cpus>,
    pub memory: Option<Size>,
    pub disk: Option<Size>,
    pub image: Option<Spanned<String>>,
    pub backend: Option<Spanned<String>>,
    pub ssh_keys: Option<Spanned<Vec<String>>>,
    pub accel: Option<Accel>,

    pub user: Option<Spanned<String>>,
    pub ssh_port: Option<Port>,
    pub spice_port: Option<Port>,
    #[serde(default)]
    pub readonly: bool,
    pub env: Option<Spanned<BTreeMap<String, String>>>,
    /// Host environment variables copied into the VM's env at `up`.
    pub pass_env: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub secrets: Vec<String>,
    pub nixos: Option<String>,
    pub purpose: Option<String>,
    /// A pinned VMID on a Proxmox backend.
    pub vmid: Option<u32>,
    /// The address `ssh` uses instead of the one the guest agent reports
    /// (Proxmox: a DNS name, or an address behind NAT).
    pub ssh_host: Option<String>,
    /// Host ports forwarded into the guest: `"8080:80"`, `"ADDR:8080:80"`.
    pub forwards: Option<Spanned<Vec<String>>>,
    /// Host folders shared with the guest.
    pub shares: Option<Spanned<Vec<RawShare>>>,
    /// `"open"`, `"none"`, or a list of `HOST:PORT` entries.
    pub egress: Option<Spanned<RawEgress>>,
    /// `{ auth_key = { file = "…" } }`: what `agentvm deploy` enrols the VM with.
    pub tailscale: Option<Spanned<RawTailscale>>,
}

/// `tailscale = { auth_key = { file = "…" } }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTailscale {
    pub auth_key: RawFileRef,
}

/// `{ file = "…" }`: a value read from a file (relative to the fleet file's folder).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileRef {
    pub file: String,
}

/// `egress` as written: a word, or a list whose entries keep their places.
#[derive(Debug)]
pub enum RawEgress {
    Word(String),
    List(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for RawEgress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawEgress;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"open\", \"none\" or a list of \"HOST:PORT\" strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawEgress, E> {
                Ok(RawEgress::Word(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawEgress, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = seq.next_element::<Spanned<String>>()? {
                    entries.push(entry);
                }
                Ok(RawEgress::List(entries))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Where each table key stands in the file, for errors about names.
#[derive(Debug, Default, Deserialize)]
pub struct KeySpans {
    #[serde(default)]
    pub images: BTreeMap<Spanned<String>, serde::de::IgnoredAny>,
    #[serde(default)]
    pub vms: BTreeMap<Spanned<String>, serde::de::IgnoredAny>,
    #[serde(default)]
    pub backends: BTreeMap<Spanned<String>, serde::de::IgnoredAny>,
}
