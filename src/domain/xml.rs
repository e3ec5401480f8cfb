//! libvirt domain XML as typed structs (quick-xml + serde). Only the elements
//! agentvm writes are modelled; libvirt fills in the rest.

use serde::{Deserialize, Serialize};

pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename = "domain")]
pub struct Domain {
    #[serde(rename = "@type")]
    pub kind: String,
    #[serde(rename = "@xmlns:qemu", skip_serializing_if = "Option::is_none")]
    pub xmlns_qemu: Option<String>,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    pub metadata: Metadata,
    pub memory: Memory,
    #[serde(rename = "memoryBacking", skip_serializing_if = "Option::is_none")]
    pub memory_backing: Option<super::share::MemoryBacking>,
    pub vcpu: u32,
    pub sysinfo: Vec<Sysinfo>,
    pub os: Os,
    pub features: Features,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    pub clock: Clock,
    pub on_poweroff: String,
    pub on_reboot: String,
    pub on_crash: String,
    pub devices: Devices,
    #[serde(rename = "qemu:commandline", skip_serializing_if = "Option::is_none")]
    pub qemu_commandline: Option<QemuCommandline>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metadata {
    #[serde(rename = "agentvm:vm")]
    pub vm: super::metadata::VmState,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Memory {
    #[serde(rename = "@unit")]
    pub unit: String,
    #[serde(rename = "$text")]
    pub value: u64,
}

/// `<sysinfo type='smbios'>` with OEM strings, or `<sysinfo type='fwcfg'>`
/// with entries whose content QEMU reads from a file (so it is on no command line).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sysinfo {
    #[serde(rename = "@type")]
    pub kind: String,
    #[serde(rename = "oemStrings", skip_serializing_if = "Option::is_none")]
    pub oem_strings: Option<OemStrings>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entry: Vec<FwCfgEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FwCfgEntry {
    #[serde(rename = "@name")]
    pub name: String,
    #[serde(rename = "@file")]
    pub file: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OemStrings {
    pub entry: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Os {
    #[serde(rename = "type")]
    pub os_type: OsType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    pub smbios: Smbios,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OsType {
    #[serde(rename = "@arch")]
    pub arch: String,
    #[serde(rename = "@machine")]
    pub machine: String,
    #[serde(rename = "$text")]
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Boot {
    #[serde(rename = "@dev")]
    pub dev: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Smbios {
    #[serde(rename = "@mode")]
    pub mode: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Features {
    pub acpi: Empty,
}

/// An element with no attributes or content.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Empty {}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cpu {
    #[serde(rename = "@mode")]
    pub mode: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Clock {
    #[serde(rename = "@offset")]
    pub offset: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Devices {
    pub disk: Vec<Disk>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub interface: Vec<Interface>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filesystem: Vec<super::share::Filesystem>,
    pub serial: Serial,
    pub channel: Vec<Channel>,
    pub graphics: Graphics,
    pub video: Video,
    pub rng: Rng,
    pub memballoon: ModelOnly,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Disk {
    #[serde(rename = "@type")]
    pub kind: String,
    #[serde(rename = "@device")]
    pub device: String,
    pub driver: DiskDriver,
    pub source: FileSource,
    pub target: DiskTarget,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readonly: Option<Empty>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiskDriver {
    #[serde(rename = "@name")]
    pub name: String,
    #[serde(rename = "@type")]
    pub format: String,
    #[serde(rename = "@discard", skip_serializing_if = "Option::is_none")]
    pub discard: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileSource {
    #[serde(rename = "@file")]
    pub file: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiskTarget {
    #[serde(rename = "@dev")]
    pub dev: String,
    #[serde(rename = "@bus")]
    pub bus: String,
}

/// A passt user-mode interface with a port forward.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Interface {
    #[serde(rename = "@type")]
    pub kind: String,
    pub mac: Mac,
    pub backend: TypeOnly,
    #[serde(rename = "portForward")]
    pub port_forward: Vec<PortForward>,
    pub model: TypeOnly,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mac {
    #[serde(rename = "@address")]
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TypeOnly {
    #[serde(rename = "@type")]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelOnly {
    #[serde(rename = "@model")]
    pub model: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortForward {
    #[serde(rename = "@proto")]
    pub proto: String,
    #[serde(rename = "@address")]
    pub address: String,
    pub range: PortRange,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortRange {
    #[serde(rename = "@start")]
    pub start: u16,
    #[serde(rename = "@to")]
    pub to: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Serial {
    #[serde(rename = "@type")]
    pub kind: String,
    pub source: LogSource,
    pub target: SerialTarget,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogSource {
    #[serde(rename = "@path")]
    pub path: String,
    #[serde(rename = "@append")]
    pub append: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SerialTarget {
    #[serde(rename = "@port")]
    pub port: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Channel {
    #[serde(rename = "@type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<ChannelSource>,
    pub target: ChannelTarget,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChannelSource {
    #[serde(rename = "@mode")]
    pub mode: String,
    #[serde(rename = "@path")]
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChannelTarget {
    #[serde(rename = "@type")]
    pub kind: String,
    #[serde(rename = "@name")]
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Graphics {
    #[serde(rename = "@type")]
    pub kind: String,
    #[serde(rename = "@port")]
    pub port: u16,
    #[serde(rename = "@autoport")]
    pub autoport: String,
    #[serde(rename = "@listen")]
    pub listen_attr: String,
    pub listen: GraphicsListen,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GraphicsListen {
    #[serde(rename = "@type")]
    pub kind: String,
    #[serde(rename = "@address")]
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Video {
    pub model: VideoModel,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VideoModel {
    #[serde(rename = "@type")]
    pub kind: String,
    #[serde(rename = "@heads")]
    pub heads: u32,
    #[serde(rename = "@primary")]
    pub primary: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rng {
    #[serde(rename = "@model")]
    pub model: String,
    pub backend: RngBackend,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RngBackend {
    #[serde(rename = "@model")]
    pub model: String,
    #[serde(rename = "$text")]
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QemuCommandline {
    #[serde(rename = "qemu:arg")]
    pub args: Vec<QemuArg>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QemuArg {
    #[serde(rename = "@value")]
    pub value: String,
}

impl Domain {
    /// Pretty XML, two-space indented, for libvirt and the golden files.
    pub fn to_xml(&self) -> Result<String, quick_xml::SeError> {
        let mut out = String::new();
        let mut ser = quick_xml::se::Serializer::new(&mut out);
        ser.indent(' ', 2);
        self.serialize(ser)?;
        out.push('\n');
        Ok(out)
    }
}

/// The parts of a defined domain's XML that agentvm reads back.
#[derive(Debug, Clone, Deserialize)]
pub struct DefinedDomain {
    pub name: String,
    #[serde(default)]
    pub metadata: Option<DefinedMetadata>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DefinedMetadata {
    #[serde(rename = "vm", alias = "agentvm:vm", default)]
    pub vm: Option<super::metadata::VmState>,
}

impl DefinedDomain {
    pub fn parse(xml: &str) -> Result<Self, quick_xml::DeError> {
        quick_xml::de::from_str(xml)
    }
}
