//! Command-line arguments.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::paths::{ENV_DAEMON_IDLE_EXIT, ENV_FILE, ENV_LIBVIRT_URI};

#[derive(Debug, Parser)]
#[command(
    name = "agentvm",
    version,
    about = "Per-user agent VMs on libvirt and Proxmox VE from one agentvm.toml"
)]
pub struct Cli {
    /// The fleet file (default: agentvm.toml here or in a parent folder).
    #[arg(long, global = true, env = ENV_FILE, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// libvirt URI of the local backend.
    #[arg(long, global = true, env = ENV_LIBVIRT_URI, default_value = crate::backend::libvirt::DEFAULT_URI)]
    pub connect: String,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a commented agentvm.toml for this machine (KVM or TCG, your SSH key, an example VM).
    Init,
    /// Create (if absent) and start VMs, then wait for SSH and the guest agent.
    Up {
        /// The VMs (default: every VM of the fleet file).
        names: Vec<String>,
        /// Return once the VMs are started, without waiting for SSH.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for SSH.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Fail at once if another operation holds a VM, instead of waiting.
        #[arg(long)]
        no_block: bool,
        /// Run the VMs on this backend instead of the one their spec names.
        #[arg(long)]
        backend: Option<String>,
    },
    /// Shut VMs down (guest agent, then ACPI), forcing them off after the timeout.
    Down {
        /// The VMs (default: every VM of the fleet file that exists).
        names: Vec<String>,
        /// Force off at once.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for a graceful shutdown.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Fail at once if another operation holds a VM, instead of waiting.
        #[arg(long)]
        no_block: bool,
    },
    /// Make running copies of a running VM (memory, devices and disk) while it keeps running.
    Fork {
        /// The running VM to copy.
        source: String,
        /// Names of the new VMs.
        #[arg(required = true)]
        new: Vec<String>,
        /// Return once the copies are restored, without waiting for SSH.
        #[arg(long)]
        no_wait: bool,
        /// Give each copy new SSH host keys and machine-id (through its guest agent).
        #[arg(long)]
        new_identity: bool,
        /// Seconds to wait for SSH.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Fail at once if another operation holds a VM, instead of waiting.
        #[arg(long)]
        no_block: bool,
    },
    /// Remove VMs: domain, disk, folder and ports.
    Destroy {
        /// The VMs to remove (or --all).
        names: Vec<String>,
        /// Every VM of the fleet file that exists.
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
        /// Fail at once if another operation holds a VM, instead of waiting.
        #[arg(long)]
        no_block: bool,
        /// First make the (stopped) forks that sit on the VMs' disks independent of them.
        #[arg(long)]
        flatten: bool,
    },
    /// All VMs of the fleet file and the backend.
    List,
    /// Some VMs, or all (as `list`: the fleet file's and those that left it).
    Status { names: Vec<String> },
    /// SSH into a VM, or run a command there.
    Ssh {
        name: String,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// `Host` blocks for ~/.ssh/config (use with `Include`).
    SshConfig { name: Option<String> },
    /// Follow a VM's serial console log.
    Console {
        name: String,
        /// Print what is there and exit.
        #[arg(long)]
        no_follow: bool,
    },
    /// Run a command in the guest through its agent (no network needed).
    Exec {
        name: String,
        /// Seconds the command may run.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Pass this command's standard input to the guest command (read to
        /// its end first; at most 64 KiB).
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Print the output while the command runs (for builds and other long
        /// commands; without it the agent hands it over when the command ends).
        #[arg(long, conflicts_with = "stdin")]
        stream: bool,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Copy files between the host and a VM (scp-like: one of SRC and DST is
    /// VM:PATH), over SSH when the VM answers, else through its guest agent.
    Cp {
        /// Copy directories and what they hold.
        #[arg(short = 'r', long)]
        recursive: bool,
        /// How to reach the guest: ssh, agent, or auto (SSH when its SSH
        /// server answers, else the agent).
        #[arg(long, value_enum, default_value = "auto")]
        via: super::cp::Via,
        src: String,
        dst: String,
    },
    /// Read the guest's SSH host key (through its agent) and pin it for `agentvm ssh`.
    Hostkey { name: String },
    /// Serve the Model Context Protocol on stdin/stdout: tools for list,
    /// status, up, down, exec, read_file, write_file, snapshot and fork.
    Mcp,
    /// Save the guest's display as a PNG file.
    Screenshot {
        name: String,
        /// Named `png`: `file` would collide with the global `--file`.
        #[arg(value_name = "FILE.png")]
        png: std::path::PathBuf,
    },
    /// Create, list, revert to or delete snapshots of a VM.
    Snapshot {
        name: String,
        #[command(subcommand)]
        action: SnapshotCommand,
        /// Fail at once if another operation holds the VM, instead of waiting.
        #[arg(long, global = true)]
        no_block: bool,
    },
    /// Scaffold a new agent: hosts/agent-NAME/ from the template and [vms.NAME] in agentvm.toml.
    New {
        name: String,
        /// The image the new VM boots; needed when [defaults] names none and
        /// the fleet file defines several.
        #[arg(long)]
        image: Option<String>,
    },
    /// Apply the VM's `nixos` flake attribute with nixos-rebuild over its SSH port.
    Provision {
        name: String,
        /// Print the command instead of running it.
        #[arg(long)]
        dry_run: bool,
    },
    /// The whole new-agent flow, one step after another: up, pin the host key, give it its
    /// secrets (secrets.nix, .sops.yaml, re-encrypt), nixos-rebuild, tailscale, docs/machines.md.
    /// Re-running changes nothing; after a failed step it resumes there.
    Deploy {
        #[arg(required = true)]
        names: Vec<String>,
        /// Print the steps instead of running them.
        #[arg(long)]
        dry_run: bool,
        /// The admin identity that can decrypt the secrets today (default ~/.ssh/id_ed25519).
        #[arg(long, value_name = "FILE")]
        identity: Option<std::path::PathBuf>,
        /// Seconds to wait for SSH in the up step.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Undo a deploy: destroy the VM, take its key out of secrets.nix/.sops.yaml and
    /// re-encrypt without it, forget its host key, drop it from docs/machines.md.
    Retire {
        name: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Also remove what `agentvm new` made: hosts/agent-NAME/, its home-manager and
        /// user files, and [vms.NAME] in agentvm.toml.
        #[arg(long)]
        purge_config: bool,
        /// The admin identity that can decrypt the secrets today (default ~/.ssh/id_ed25519).
        #[arg(long, value_name = "FILE")]
        identity: Option<std::path::PathBuf>,
    },
    /// Work on the age-encrypted secrets of VMs.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// Show what `up` would change (create, settings old → new, resize, start); changes nothing.
    Plan {
        names: Vec<String>,
        /// Plan for this backend instead of each VM's own.
        #[arg(long)]
        backend: Option<String>,
    },
    /// Proxmox VE helpers.
    Proxmox {
        #[command(subcommand)]
        command: ProxmoxCommand,
    },
    /// Work on images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// A Markdown table of every VM (or JSON with --json).
    Inventory,
    /// Follow VM lifecycle events (started, stopped, crashed, …).
    Events,
    /// Run the daemon in the foreground (the CLI starts one on demand).
    Daemon {
        /// Write a systemd user unit for the daemon and exit.
        #[arg(long, conflicts_with = "stop")]
        install_unit: bool,
        /// Stop the running daemon.
        #[arg(long)]
        stop: bool,
        /// Exit after this long with no client and nothing in flight (30s, 15m,
        /// 1h); 0 or off: never. The next command starts a new daemon.
        #[arg(long, env = ENV_DAEMON_IDLE_EXIT, default_value = crate::daemon::idle::DEFAULT_IDLE_EXIT)]
        idle_exit: String,
    },
    /// List a running VM's port forwards, add one (HOSTPORT:GUESTPORT or
    /// ADDR:HOSTPORT:GUESTPORT) until its next start, or remove one added so.
    Forward {
        name: String,
        /// HOSTPORT:GUESTPORT (on 127.0.0.1) or ADDR:HOSTPORT:GUESTPORT.
        #[arg(value_name = "MAPPING", conflicts_with = "remove")]
        mapping: Option<crate::spec::Forward>,
        /// Remove the forward added on this host port.
        #[arg(long, value_name = "HOSTPORT")]
        remove: Option<u16>,
    },
    /// Show a VM's egress policy, its proxy tunnel and the connections its
    /// proxy admitted and refused lately.
    Egress { name: String },
    /// Print a shell completion script (the README says where each shell looks for it).
    Completions { shell: clap_complete::Shell },
    /// Print the man page, or write agentvm.1 and one page per subcommand into a folder.
    Man {
        /// Write the pages into this folder instead of printing agentvm.1.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Print how to reach the VM's SPICE display: a URI (local) or a
    /// remote-viewer file with a one-time ticket (Proxmox).
    Spice {
        name: String,
        /// Start remote-viewer on it.
        #[arg(long)]
        open: bool,
    },
    /// Set running guests' clocks to the host's through their agents (the
    /// daemon does it by itself when the host wakes from suspend).
    SyncClock {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot (named snap-<time> unless named here).
    Create {
        snapshot: Option<String>,
    },
    List,
    /// Go back to a snapshot (a running VM keeps running, from that moment).
    Revert {
        snapshot: String,
    },
    Delete {
        snapshot: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build a `flake = "…#attr"` image with nix and import it (skipped when the flake's lock
    /// file and attribute are unchanged).
    Build {
        name: String,
        /// Build even if nothing changed.
        #[arg(long)]
        rebuild: bool,
    },
    /// Make a template of a `file` or `flake` image on a Proxmox backend (imported or built
    /// here first, as `up` would); VMs of the image there are then cloned from it. Nothing
    /// is done when a template of the image's digest is already there.
    Push {
        name: String,
        /// The [backends.NAME] to push to.
        #[arg(long)]
        backend: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Add the VM's SSH host key as a recipient of its secrets (agenix secrets.nix and
    /// .sops.yaml) and re-encrypt its .age files; --remove takes it away again.
    Rekey {
        name: String,
        /// The admin identity that can decrypt the secrets today.
        #[arg(long, value_name = "FILE")]
        identity: Option<std::path::PathBuf>,
        /// The host public key to add (default: the pinned key, or read from the running VM).
        #[arg(long, value_name = "FILE", conflicts_with = "remove")]
        host_key: Option<std::path::PathBuf>,
        /// Remove the recipient agentvm added for this VM (e.g. after destroy).
        #[arg(long)]
        remove: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProxmoxCommand {
    /// With the backend's (admin) token: create USER, a pool pool-USER, the PVEVMAdmin role on
    /// it and an API token for USER; print the token once.
    BootstrapUser {
        user: String,
        /// The [backends.NAME] whose token is an admin's.
        #[arg(long)]
        backend: String,
    },
}
