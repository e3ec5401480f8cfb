//! Building a VM's libvirt domain from its resolved plan.

pub mod metadata;
pub mod share;
pub mod xml;

use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::paths::Home;
use crate::spec::VmSpec;
pub use metadata::{AGENTVM_NS, BOOT_DIRECT, BOOT_DISK, DOMAIN_PREFIX, VmState, domain_name};
use xml::*;

/// Guest port the SSH forward points at.
pub const GUEST_SSH_PORT: u16 = 22;
/// The id of the SLIRP netdev, which QMP/HMP `hostfwd_add` names.
pub const SLIRP_NETDEV: &str = "agentvm-net0";
/// The SSH and SPICE listeners bind here only (port forwards bind where they say).
pub const LISTEN_ADDRESS: &str = "127.0.0.1";
/// PCI slot on the q35 root bus for the SLIRP NIC; libvirt does not manage
/// devices added through `<qemu:commandline>`, so the address is fixed by hand.
pub const SLIRP_NIC_PCI_ADDR: &str = "0x10";
/// The systemd credential that carries SSH authorized keys for root.
pub const SSH_KEYS_CREDENTIAL: &str = "ssh.authorized_keys.root";
/// The systemd (≥ 254) credential whose `fstab` lines are mounted at boot: the
/// VM's shares.
pub const FSTAB_CREDENTIAL: &str = "fstab.extra";
/// The systemd credential that carries the VM's `env` table (`KEY=VALUE` lines).
pub const ENV_CREDENTIAL: &str = "agentvm.env";
/// Where systemd (≥ 252) looks for credentials in QEMU's fw_cfg; it imports
/// `opt/io.systemd.credentials/NAME` as the system credential `NAME`.
pub const FW_CFG_CREDENTIALS: &str = "opt/io.systemd.credentials";
/// The guest agent's virtio-serial port name.
pub const GUEST_AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";
/// The SPICE agent's virtio-serial port name.
pub const SPICE_AGENT_CHANNEL: &str = "com.redhat.spice.0";

/// How the guest runs: hardware virtualization or QEMU's software emulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }

    fn domain_type(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "qemu",
        }
    }
}

/// How the user-mode network with the SSH forward is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// libvirt's passt backend with `<portForward>`.
    Passt,
    /// QEMU's built-in SLIRP with `hostfwd`, added through `<qemu:commandline>`.
    Slirp,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passt => "passt",
            Self::Slirp => "slirp",
        }
    }
}

/// Direct kernel boot parameters, with paths in the image store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    /// The disk also boots through its own bootloader: a NixOS image's
    /// kernel and initrd, which stop being the system's once it is rebuilt
    /// in the guest (`provision`); the VM then boots from its disk.
    pub disk_boots: bool,
}

/// Everything needed to write one VM's domain XML.
#[derive(Debug, Clone)]
pub struct DomainPlan {
    pub memory_kib: u64,
    pub cpus: u32,
    pub accel: Accel,
    pub network: NetworkMode,
    pub disk: PathBuf,
    pub kernel: Option<KernelBoot>,
    pub serial_log: PathBuf,
    /// The host end of the guest agent channel. libvirt's default path lives
    /// under the home folder and can exceed the 107-byte limit of a UNIX socket
    /// path, so agentvm names a short one in the per-user runtime folder.
    pub guest_agent_socket: PathBuf,
    pub authorized_keys: Vec<String>,
    /// The 0600 file holding the VM's `env` (see [`crate::spec::env_file`]),
    /// handed to the guest through fw_cfg as the `agentvm.env` credential; `None`
    /// when the VM has no env. The values are never in the domain XML.
    pub env_file: Option<PathBuf>,
    /// The NoCloud seed disk (`cidata`) of a `cloud_init` image, attached
    /// read-only; `None` for other images.
    pub seed: Option<PathBuf>,
    pub state: VmState,
    /// Where each virtio-fs share's virtiofsd listens, by share position.
    pub share_sockets: Vec<PathBuf>,
    /// The UUID of the domain being redefined; libvirt requires it to match.
    pub uuid: Option<String>,
}

impl DomainPlan {
    /// The plan for `spec`: its disk and log live in the VM's folder under `home`;
    /// `agentvm_key` is delivered along with the spec's own `ssh_keys`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spec: &VmSpec,
        home: &Home,
        runtime_dir: &Path,
        kernel: Option<KernelBoot>,
        agentvm_key: &str,
        accel: Accel,
        network: NetworkMode,
        state: VmState,
    ) -> Self {
        let name = spec.name.as_str();
        let mut authorized_keys = vec![agentvm_key.to_string()];
        authorized_keys.extend(spec.ssh_keys.iter().cloned());
        Self {
            memory_kib: spec.memory.kib_ceil(),
            cpus: spec.cpus,
            accel,
            network,
            disk: home.vm_disk(name),
            kernel,
            serial_log: home.vm_serial_log(name),
            guest_agent_socket: guest_agent_socket(runtime_dir, name),
            authorized_keys,
            env_file: spec.has_guest_env().then(|| home.vm_env_file(name)),
            seed: None,
            share_sockets: (0..state.shares.len())
                .map(|i| share::share_socket(runtime_dir, name, &crate::spec::Share::tag(i)))
                .collect(),
            state,
            uuid: None,
        }
    }

    pub fn domain_name(&self) -> String {
        domain_name(&self.state.name)
    }

    pub fn to_xml(&self) -> Result<String, quick_xml::SeError> {
        self.to_domain().to_xml()
    }

    pub fn to_domain(&self) -> Domain {
        let (interface, qemu_commandline) = match self.network {
            NetworkMode::Passt => (vec![self.passt_interface()], None),
            NetworkMode::Slirp => (Vec::new(), Some(self.slirp_commandline())),
        };
        Domain {
            kind: self.accel.domain_type().to_string(),
            xmlns_qemu: qemu_commandline.as_ref().map(|_| QEMU_NS.to_string()),
            name: self.domain_name(),
            uuid: self.uuid.clone(),
            metadata: Metadata {
                vm: self.state.clone(),
            },
            memory: Memory {
                unit: "KiB".into(),
                value: self.memory_kib,
            },
            memory_backing: self
                .state
                .shares
                .iter()
                .any(|s| s.kind == crate::spec::ShareKind::Virtiofs)
                .then(share::MemoryBacking::shared_memfd),
            vcpu: self.cpus,
            sysinfo: self.sysinfo(),
            os: Os {
                os_type: OsType {
                    arch: "x86_64".into(),
                    machine: "q35".into(),
                    value: "hvm".into(),
                },
                kernel: self.kernel.as_ref().map(|k| path_str(&k.kernel)),
                initrd: self
                    .kernel
                    .as_ref()
                    .and_then(|k| k.initrd.as_ref().map(|p| path_str(p))),
                cmdline: self.kernel.as_ref().and_then(|k| k.cmdline.clone()),
                boot: match self.kernel {
                    Some(_) => None,
                    None => Some(Boot { dev: "hd".into() }),
                },
                smbios: Smbios {
                    mode: "sysinfo".into(),
                },
            },
            features: Features { acpi: Empty {} },
            cpu: match self.accel {
                Accel::Kvm => Some(Cpu {
                    mode: "host-passthrough".into(),
                }),
                Accel::Tcg => None,
            },
            clock: Clock {
                offset: "utc".into(),
            },
            on_poweroff: "destroy".into(),
            on_reboot: "restart".into(),
            on_crash: "destroy".into(),
            devices: Devices {
                disk: self.disks(),
                interface,
                filesystem: self
                    .state
                    .shares
                    .iter()
                    .zip(&self.share_sockets)
                    .enumerate()
                    .map(|(i, (s, socket))| share::filesystem(s, i, socket))
                    .collect(),
                serial: Serial {
                    kind: "file".into(),
                    source: LogSource {
                        path: path_str(&self.serial_log),
                        append: "on".into(),
                    },
                    target: SerialTarget { port: 0 },
                },
                channel: vec![
                    Channel {
                        kind: "unix".into(),
                        source: Some(ChannelSource {
                            mode: "bind".into(),
                            path: path_str(&self.guest_agent_socket),
                        }),
                        target: ChannelTarget {
                            kind: "virtio".into(),
                            name: GUEST_AGENT_CHANNEL.into(),
                        },
                    },
                    Channel {
                        kind: "spicevmc".into(),
                        source: None,
                        target: ChannelTarget {
                            kind: "virtio".into(),
                            name: SPICE_AGENT_CHANNEL.into(),
                        },
                    },
                ],
                graphics: Graphics {
                    kind: "spice".into(),
                    port: self.state.spice_port,
                    autoport: "no".into(),
                    listen_attr: LISTEN_ADDRESS.into(),
                    listen: GraphicsListen {
                        kind: "address".into(),
                        address: LISTEN_ADDRESS.into(),
                    },
                },
                video: Video {
                    model: VideoModel {
                        kind: "virtio".into(),
                        heads: 1,
                        primary: "yes".into(),
                    },
                },
                rng: Rng {
                    model: "virtio".into(),
                    backend: RngBackend {
                        model: "random".into(),
                        device: "/dev/urandom".into(),
                    },
                },
                memballoon: ModelOnly {
                    model: "virtio".into(),
                },
            },
            qemu_commandline,
        }
    }

    /// The root disk, and the NoCloud seed (read-only, raw) when there is one.
    fn disks(&self) -> Vec<Disk> {
        let mut disks = vec![Disk {
            kind: "file".into(),
            device: "disk".into(),
            driver: DiskDriver {
                name: "qemu".into(),
                format: "qcow2".into(),
                discard: Some("unmap".into()),
            },
            source: FileSource {
                file: path_str(&self.disk),
            },
            target: DiskTarget {
                dev: "vda".into(),
                bus: "virtio".into(),
            },
            readonly: None,
        }];
        if let Some(seed) = &self.seed {
            disks.push(Disk {
                kind: "file".into(),
                device: "disk".into(),
                driver: DiskDriver {
                    name: "qemu".into(),
                    format: "raw".into(),
                    discard: None,
                },
                source: FileSource {
                    file: path_str(seed),
                },
                target: DiskTarget {
                    dev: "vdb".into(),
                    bus: "virtio".into(),
                },
                readonly: Some(Empty {}),
            });
        }
        disks
    }

    /// The SSH keys as an SMBIOS type 11 credential (public, so a command line
    /// may carry them) and the env as an fw_cfg credential read from its file.
    fn sysinfo(&self) -> Vec<Sysinfo> {
        let mut oem = vec![format!(
            "io.systemd.credential:{SSH_KEYS_CREDENTIAL}={}",
            self.authorized_keys.join("\n")
        )];
        if !self.state.shares.is_empty() {
            oem.push(format!(
                "io.systemd.credential:{FSTAB_CREDENTIAL}={}",
                share::fstab(&self.state.shares)
            ));
        }
        let mut sysinfo = vec![Sysinfo {
            kind: "smbios".into(),
            oem_strings: Some(OemStrings { entry: oem }),
            entry: Vec::new(),
        }];
        if let Some(file) = &self.env_file {
            sysinfo.push(Sysinfo {
                kind: "fwcfg".into(),
                oem_strings: None,
                entry: vec![FwCfgEntry {
                    name: format!("{FW_CFG_CREDENTIALS}/{ENV_CREDENTIAL}"),
                    file: path_str(file),
                }],
            });
        }
        sysinfo
    }

    fn passt_interface(&self) -> Interface {
        Interface {
            kind: "user".into(),
            mac: Mac {
                address: mac_address(&self.state.name),
            },
            backend: TypeOnly {
                kind: "passt".into(),
            },
            port_forward: std::iter::once(PortForward {
                proto: "tcp".into(),
                address: LISTEN_ADDRESS.into(),
                range: PortRange {
                    start: self.state.ssh_port,
                    to: GUEST_SSH_PORT,
                },
            })
            .chain(self.state.forwards.iter().map(|f| PortForward {
                proto: "tcp".into(),
                address: f.host_addr.to_string(),
                range: PortRange {
                    start: f.host_port,
                    to: f.guest_port,
                },
            }))
            .collect(),
            model: TypeOnly {
                kind: "virtio".into(),
            },
        }
    }

    fn slirp_commandline(&self) -> QemuCommandline {
        let mut netdev = format!(
            "user,id={SLIRP_NETDEV},hostfwd=tcp:{LISTEN_ADDRESS}:{}-:{GUEST_SSH_PORT}",
            self.state.ssh_port
        );
        // egress other than open: the guest's own connections out are refused
        // (hostfwd, DHCP and the guest agent keep working).
        if self.state.egress.is_some() {
            netdev.push_str(",restrict=on");
        }
        for forward in &self.state.forwards {
            netdev.push_str(",hostfwd=");
            netdev.push_str(&forward.forward().hostfwd());
        }
        let device = format!(
            "virtio-net-pci,netdev={SLIRP_NETDEV},mac={},bus=pcie.0,addr={SLIRP_NIC_PCI_ADDR},romfile=",
            mac_address(&self.state.name)
        );
        QemuCommandline {
            args: ["-netdev", &netdev, "-device", &device]
                .into_iter()
                .map(|value| QemuArg {
                    value: value.to_string(),
                })
                .collect(),
        }
    }
}

/// `<runtime dir>/<vm>.qga`: the guest agent socket of a VM.
pub fn guest_agent_socket(runtime_dir: &Path, vm: &str) -> PathBuf {
    runtime_dir.join(format!("{vm}{}", crate::paths::GUEST_AGENT_SOCKET_SUFFIX))
}

/// The longest path a UNIX socket can be bound at (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// A stable locally administered MAC in QEMU's 52:54:00 range, from the VM name.
pub fn mac_address(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2]
    )
}

/// The hash of a VM's machine as applied on this host: its spec's
/// [`VmSpec::machine`] view plus the accelerator and network chosen here. A
/// stored hash that differs from the current one means the domain no longer
/// matches its spec; fields outside that view (purpose, readonly, secrets…)
/// never make a VM need a redefinition or a restart.
///
/// The port forwards, the egress policy and the shares are part of it here
/// (they are in the domain's definition, and egress in the guest's env); a VM
/// without forwards and shares and with open egress hashes as it did before
/// they existed.
pub fn spec_hash(spec: &VmSpec, accel: Accel, network: NetworkMode) -> String {
    let (machine, forwards, egress) = (spec.machine(), &spec.forwards, &spec.egress);
    let canonical = if !spec.shares.is_empty() {
        serde_json::to_vec(&(machine, accel, network, forwards, egress, &spec.shares))
    } else {
        match (forwards.is_empty(), egress.is_open()) {
            (true, true) => serde_json::to_vec(&(machine, accel, network)),
            (false, true) => serde_json::to_vec(&(machine, accel, network, forwards)),
            _ => serde_json::to_vec(&(machine, accel, network, forwards, egress)),
        }
    }
    .expect("a VM spec always serializes to JSON");
    format!("sha256:{}", hex::encode(Sha256::digest(&canonical)))
}

/// A domain definition with its direct kernel boot (`<kernel>`, `<initrd>`,
/// `<cmdline>` of `<os>`) taken out, so it boots from its disk.
pub fn without_direct_boot(xml: &str) -> anyhow::Result<String> {
    let mut out = xml.to_string();
    for tag in ["kernel", "initrd", "cmdline"] {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        if let Some(start) = out.find(&open) {
            let end = out[start..]
                .find(&close)
                .map(|i| start + i + close.len())
                .with_context(|| format!("unterminated {open} in the domain XML"))?;
            // The element's own line goes too.
            let line_start = out[..start].rfind('\n').map_or(start, |i| i + 1);
            let from = if out[line_start..start].trim().is_empty() {
                line_start
            } else {
                start
            };
            let to = if out[end..].starts_with('\n') {
                end + 1
            } else {
                end
            };
            out.replace_range(from..to, "");
        }
    }
    let os_end = out.find("</os>").context("no </os> in the domain XML")?;
    let os_start = out[..os_end]
        .rfind("<os")
        .context("no <os> in the domain XML")?;
    if !out[os_start..os_end].contains("<boot ") {
        out.insert_str(os_end, "  <boot dev='hd'/>\n  ");
    }
    Ok(out)
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
pub(crate) mod tests;
