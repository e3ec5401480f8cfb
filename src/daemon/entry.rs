//! The arguments of the `agentvm-daemon` executable, and the one question it
//! answers without serving: whether KVM is usable (`agentvm init` asks, so the
//! CLI needs no libvirt of its own).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

use crate::paths::{ENV_DAEMON_IDLE_EXIT, ENV_LIBVIRT_URI};

/// The daemon executable's file name, installed next to `agentvm`.
pub const DAEMON_EXE: &str = "agentvm-daemon";

#[derive(Parser, Debug)]
#[command(
    name = "agentvm-daemon",
    version,
    about = "The agentvm daemon (normally started by the agentvm command on demand)"
)]
struct DaemonArgs {
    /// The libvirt URI of the local backend.
    #[arg(long, env = ENV_LIBVIRT_URI, default_value = crate::backend::libvirt::DEFAULT_URI)]
    connect: String,
    /// Exit after this long with no client and nothing in flight (30s, 15m,
    /// 1h); 0 or off: never.
    #[arg(long, env = ENV_DAEMON_IDLE_EXIT, default_value = super::idle::DEFAULT_IDLE_EXIT)]
    idle_exit: String,
    /// Print whether KVM is usable on --connect as one JSON line and exit.
    #[arg(long)]
    kvm_check: bool,
}

/// Whether KVM is usable, as `agentvm-daemon --kvm-check` prints it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct KvmCheck {
    /// Why KVM is not usable; `None` when it is.
    pub unusable: Option<String>,
}

/// Runs the daemon executable; the return value is the process exit code.
pub fn main() -> i32 {
    let args = DaemonArgs::parse();
    crate::logging::init(if args.kvm_check { "warn" } else { "info" });
    let result = if args.kvm_check {
        kvm_check(&args.connect)
    } else {
        super::idle::parse_idle_exit(&args.idle_exit)
            .and_then(|idle_exit| super::run(&args.connect, idle_exit))
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("agentvm-daemon: error: {e:#}");
            1
        }
    }
}

fn kvm_check(uri: &str) -> Result<()> {
    let unusable = match crate::backend::libvirt::kvm_device_unusable() {
        Some(why) => Some(why),
        None => {
            // libvirt prints every error to stderr by default; the answer says why.
            virt::error::clear_error_callback();
            match virt::connect::Connect::open(Some(uri)) {
                Err(e) => Some(format!(
                    "libvirt at {uri} could not be asked ({})",
                    e.message()
                )),
                Ok(conn) => crate::backend::libvirt::kvm_unusable(&conn)
                    .unwrap_or_else(|e| Some(format!("{e:#}"))),
            }
        }
    };
    println!("{}", serde_json::to_string(&KvmCheck { unusable })?);
    Ok(())
}

/// The daemon executable beside the running `agentvm`.
pub fn daemon_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the agentvm executable")?;
    let daemon = exe.with_file_name(DAEMON_EXE);
    if !daemon.is_file() {
        anyhow::bail!(
            "{} is missing: agentvm runs its daemon from there (install both executables: \
             `cargo install --path .` or the Nix package does)",
            daemon.display()
        );
    }
    Ok(daemon)
}
