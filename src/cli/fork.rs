//! `fork`: running copies of a running VM.

use anyhow::{Result, bail};

use super::{App, output};
use crate::protocol::{Answer, Op, Outcome};

/// Forks `source` into `new`; prints one line (or JSON object) per fork.
pub fn fork(
    app: &App,
    source: &str,
    new: &[String],
    wait_secs: Option<u64>,
    new_identity: bool,
    no_block: bool,
) -> Result<i32> {
    let op = Op::Fork {
        new: new.to_vec(),
        wait_secs,
        new_identity,
    };
    let mut results = app.call(&[source.to_string()], op, no_block)?;
    let Some(result) = results.pop() else {
        bail!("{source}: the daemon gave no answer");
    };
    let outcome = match result.answer {
        Answer::Ok(Outcome::Forked(outcome)) => outcome,
        Answer::Ok(other) => bail!("{source}: unexpected answer {other:?}"),
        Answer::Error { message, .. } => {
            errln!("agentvm: error: {}", output::vm_error(source, &message));
            return Ok(1);
        }
    };
    if app.json {
        output::print_json(&outcome.forks)?;
        return Ok(0);
    }
    outln!(
        "{source}: snapshot taken in {:.1}s (paused {:.2}s)",
        outcome.snapshot_seconds,
        outcome.paused_seconds
    );
    for fork in &outcome.forks {
        let ready = match fork.ssh_ready_seconds {
            Some(s) => format!("ssh ready {s:.1}s after the fork began"),
            None => "restored (not waiting for ssh)".to_string(),
        };
        let identity = if fork.new_identity {
            "; new identity"
        } else {
            ""
        };
        outln!(
            "{}: forked from {source}, {ready} (ssh port {}, spice port {}){identity}; connect with: agentvm ssh {}",
            fork.name,
            fork.ssh_port,
            fork.spice_port,
            fork.name
        );
    }
    Ok(0)
}
