//! `init`, `completions` and `man`: what a new user runs before any VM exists.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;

use super::Cli;
use crate::init::{self, ExampleImage};
use crate::paths::FLEET_FILE;

/// Writes a fleet file for this machine at `file` (default `./agentvm.toml`).
pub fn init(file: Option<&Path>, uri: &str, json: bool) -> Result<i32> {
    let path = file.map_or_else(|| PathBuf::from(FLEET_FILE), Path::to_path_buf);
    // Checked again when the file is created; this only skips the detection.
    if path.exists() {
        return Err(init::exists_error(&path));
    }
    let facts = init::detect(uri);
    init::write_new(&path, &init::generate(&facts))?;
    let shown = path.display();
    if json {
        super::output::print_json(&serde_json::json!({
            "file": path,
            "accel": if facts.kvm.is_ok() { "kvm" } else { "tcg" },
            "ssh_key": facts.ssh_key,
            "image_found": matches!(facts.image, ExampleImage::TestGuest(_)),
            "vm": init::EXAMPLE_VM,
        }))?;
        return Ok(0);
    }
    outln!("wrote {shown}");
    match &facts.kvm {
        Ok(()) => outln!("  accel = \"kvm\": KVM is usable here"),
        Err(why) => outln!("  accel = \"tcg\": KVM is not usable here ({why})"),
    }
    match &facts.ssh_key {
        Some(key) => outln!("  ssh_keys = [\"{key}\"]"),
        None => outln!(
            "  no SSH public key found in ~/.ssh: ssh_keys is left commented out (agentvm ssh works without it)"
        ),
    }
    let explicit = if file.is_some() {
        format!(" --file {shown}")
    } else {
        String::new()
    };
    match &facts.image {
        ExampleImage::TestGuest(dir) => {
            outln!(
                "  [vms.{}] boots the test guest in {}",
                init::EXAMPLE_VM,
                dir.display()
            );
            outln!("next: agentvm{explicit} up");
        }
        ExampleImage::Missing => {
            outln!(
                "  [vms.{}] boots {}, which is not on this machine yet; `agentvm up` fails naming it until you get it:",
                init::EXAMPLE_VM,
                init::CLOUD_IMAGE
            );
            outln!(
                "    mkdir -p ~/images && curl -Lo {} {}",
                init::CLOUD_IMAGE,
                init::CLOUD_IMAGE_URL
            );
            outln!("next: get the image as above, then agentvm{explicit} up");
        }
    }
    Ok(0)
}

/// Prints the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Result<i32> {
    let mut cmd = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "agentvm", &mut script);
    super::stdout::write_bytes(&script);
    Ok(0)
}

/// Prints agentvm.1, or writes it and one page per subcommand into `out`.
pub fn man(out: Option<&Path>) -> Result<i32> {
    let cmd = Cli::command();
    match out {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .context("writing the man page")?;
            super::stdout::write_bytes(&page);
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            outln!(
                "wrote {} and a page per subcommand (agentvm-up.1, …)",
                dir.join("agentvm.1").display()
            );
        }
    }
    Ok(0)
}
