//! The NixOS flow: `new`, `image build`, `provision` and `secrets rekey`.

use anyhow::{Context, Result, bail};

use super::{App, guest, output, show_event, status};
use crate::progress::Console;
use crate::protocol::{Op, Outcome, Request};

pub fn new_agent(app: &App, name: &str, image: Option<&str>) -> Result<i32> {
    let fleet = app.fleet()?;
    let name = crate::spec::Name::new(name)?;
    // Reserve ports no VM has, defined or pinned in the fleet file.
    let mut claims = crate::ports::Claims::default();
    for row in status::all_rows(app)?.0 {
        for port in [row.ssh_port, row.spice_port].into_iter().flatten() {
            claims.add(port, &row.name);
        }
    }
    for vm in fleet.vms.values() {
        for port in [vm.ssh_port, vm.spice_port].into_iter().flatten() {
            claims.add(port, vm.name.as_str());
        }
    }
    let ssh = crate::ports::choose(
        "ssh",
        crate::ports::SSH_PORT_BASE,
        name.as_str(),
        None,
        None,
        &claims,
    )?;
    claims.add(ssh, &format!("{name} (ssh)"));
    let spice = crate::ports::choose(
        "spice",
        crate::ports::SPICE_PORT_BASE,
        name.as_str(),
        None,
        None,
        &claims,
    )?;
    let made = crate::scaffold::scaffold(fleet, &name, image, ssh, spice)?;
    if app.json {
        output::print_json(&made)?;
    } else {
        match &made.host_config {
            Some(host) => outln!(
                "{name}: wrote {} and added [vms.{name}] to {} (ssh port {ssh}, spice port {spice})",
                host.display(),
                fleet.file.display()
            ),
            None => outln!(
                "{name}: added [vms.{name}] to {} (ssh port {ssh}, spice port {spice})",
                fleet.file.display()
            ),
        }
        if let Some(path) = &made.user_module {
            let how = if let (true, Some(host)) = (made.user_module_imported, &made.host_config) {
                format!(" (imported by {})", host.display())
            } else {
                String::new()
            };
            outln!("  wrote {}{how}", path.display());
        }
        if let Some(path) = &made.home_manager {
            outln!("  wrote {}", path.display());
        }
        for step in &made.wire_by_hand {
            outln!("  to do: {step}");
        }
    }
    Ok(0)
}

pub fn provision(app: &App, name: &str, dry_run: bool) -> Result<i32> {
    let fleet = app.fleet()?;
    let spec = fleet.vm(name)?;
    let endpoint = guest::endpoint(app, name)?;
    let mut cmd = crate::provision::command(&fleet.file, name, spec.nixos.as_deref(), &endpoint)?;
    if dry_run {
        outln!("{}", crate::provision::shell_line(&cmd));
        return Ok(0);
    }
    // Before the switch: once it has begun, the VM's disk may hold another
    // system than its image's (nixos-rebuild can fail after installing the
    // new generation), so a VM that booted the image's kernel directly boots
    // through its disk's bootloader, which knows the current generation.
    if let Outcome::SystemChanged { boot: Some(boot) } = app.call_one(name, Op::SystemChanged)? {
        errln!(
            "{name}: boots through its {boot}'s bootloader from its next start on (its system will no longer be its image's); \
             until then a reboot inside the guest starts the image's system again: use agentvm down {name} && agentvm up {name}"
        );
    }
    // Output streams straight through: nixos-rebuild's own progress is what the user wants.
    let status = cmd.status().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow::anyhow!(
            "{} is not installed (it comes with Nix/NixOS); --dry-run shows the command",
            cmd.get_program().to_string_lossy()
        ),
        _ => anyhow::Error::new(e).context("running nixos-rebuild"),
    })?;
    Ok(status.code().unwrap_or(1))
}

pub fn secrets_rekey(
    app: &App,
    name: &str,
    identity: Option<std::path::PathBuf>,
    host_key: Option<std::path::PathBuf>,
    remove: bool,
) -> Result<i32> {
    let fleet = app.fleet()?;
    let spec = fleet.vm(name)?;
    app.home.ensure()?;
    if spec.secrets.is_empty() {
        bail!("{}: vms.{name} has no secrets", fleet.file.display());
    }
    let identity = crate::secrets::admin_identity(identity)?;
    let key = if remove {
        None
    } else if let Some(path) = host_key {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Some(text)
    } else {
        let pinned = app.home.vm_pinned_host_key(name);
        match std::fs::read_to_string(&pinned) {
            Ok(text) => Some(text),
            Err(_) => match app.call_one(name, Op::HostKey)? {
                Outcome::HostKey(key) => Some(key.key),
                other => bail!("{name}: unexpected answer {other:?}"),
            },
        }
    };
    let key = key
        .map(|k| crate::ssh::public_key_of(&k))
        .transpose()
        .context("the host key")?;
    let fleet_dir = crate::spec::fleet_dir(&fleet.file);
    let report = crate::secrets::rekey(
        name,
        &spec.secrets,
        fleet_dir,
        key.as_deref(),
        &identity,
        &app.home.secrets_record(),
    )?;
    if app.json {
        output::print_json(&report)?;
    } else {
        let verb = if remove { "removed" } else { "added" };
        outln!("{name}: {verb} recipient {}", report.recipient);
        for file in &report.rekeyed {
            outln!("  re-encrypted {}", file.display());
        }
        for file in &report.unchanged {
            outln!("  already encrypted to its recipients: {}", file.display());
        }
        for file in &report.edited {
            outln!("  edited {}", file.display());
        }
        for file in &report.sops_files {
            outln!(
                "  run `sops updatekeys {}` to re-encrypt it",
                file.display()
            );
        }
    }
    for (file, why) in &report.failed {
        errln!("agentvm: error: {}: left as it was: {why}", file.display());
    }
    // A removal is complete (for agentvm) once no file failed; the sops files
    // named above still need `sops updatekeys`.
    if remove && report.failed.is_empty() {
        crate::secrets::forget(name, &app.home.secrets_record())?;
    }
    Ok(i32::from(!report.failed.is_empty()))
}

pub fn image_build(app: &App, name: &str, rebuild: bool) -> Result<i32> {
    let fleet = app.fleet()?;
    let image = fleet
        .images
        .get(name)
        .with_context(|| format!("{}: no image named {name:?}", fleet.file.display()))?
        .clone();
    let console = Console::new(false);
    let json = app.json;
    let results = app
        .daemon()?
        .call(Request::ImageBuild { image, rebuild }, &mut |event| {
            show_event(&console, json, event)
        })?;
    app.report(results, |_, outcome| match outcome {
        Outcome::Built(b) if b.built => format!("built and imported as {}", b.digest),
        Outcome::Built(b) => format!("up to date ({})", b.digest),
        other => format!("{other:?}"),
    })
}
