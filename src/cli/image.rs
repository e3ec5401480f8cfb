//! `image push`: an image of the fleet file as a template on a remote backend.

use anyhow::{Context, Result};

use super::{App, output, show_event};
use crate::backend::PushAction;
use crate::progress::Console;
use crate::protocol::{Answer, Outcome, PushedImage, Request};

pub fn push(app: &App, name: &str, backend: &str) -> Result<i32> {
    let fleet = app.fleet()?;
    let image = fleet
        .images
        .get(name)
        .with_context(|| format!("{}: no image named {name:?}", fleet.file.display()))?
        .clone();
    let request = Request::ImagePush {
        image,
        backend: backend.to_string(),
        backends: app.remote_configs(&[backend])?,
    };
    let console = Console::new(false);
    let json = app.json;
    let mut results = app
        .daemon()?
        .call(request, &mut |event| show_event(&console, json, event))?;
    let result = results.pop().context("the daemon returned no result")?;
    match result.answer {
        Answer::Ok(Outcome::Pushed(pushed)) => {
            if json {
                output::print_json(&pushed)?;
            } else {
                outln!("{}", pushed_line(&pushed));
            }
            Ok(0)
        }
        Answer::Ok(other) => anyhow::bail!("{name}: unexpected answer {other:?}"),
        Answer::Error { message, .. } => {
            errln!("agentvm: error: {name}: {message}");
            Ok(1)
        }
    }
}

fn pushed_line(p: &PushedImage) -> String {
    match p.action {
        PushAction::Pushed => format!(
            "{} on {}: pushed as template {} on node {} (digest {})",
            p.image, p.backend, p.vmid, p.node, p.digest
        ),
        PushAction::Unchanged => format!(
            "{} on {}: unchanged, template {} on node {} already holds digest {}",
            p.image, p.backend, p.vmid, p.node, p.digest
        ),
    }
}
