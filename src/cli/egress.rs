//! `agentvm egress NAME`: a VM's egress policy, its proxy tunnel and the
//! connections its proxy admitted and refused lately.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Result, bail};

use super::{App, output};
use crate::clock::format_time;
use crate::protocol::{EgressReport, Op, Outcome};
use crate::spec::Egress;

pub fn show(app: &App, name: &str) -> Result<i32> {
    let report = match app.call_one(name, Op::Egress)? {
        Outcome::Egress(report) => report,
        other => bail!("{name}: unexpected answer {other:?}"),
    };
    if app.json {
        output::print_json(&report)?;
    } else {
        out!("{}", text(name, &report));
    }
    Ok(0)
}

fn text(name: &str, report: &EgressReport) -> String {
    let mut out = format!(
        "{name}: egress {}{}\n",
        report.policy,
        match report.policy {
            Egress::Open => " (anything the user network reaches)",
            Egress::None => " (the guest reaches nothing outside)",
            Egress::Allow(_) => " (through the host's proxy only)",
        }
    );
    match (&report.tunnel, &report.policy) {
        (Some(tunnel), _) => out.push_str(&format!(
            "proxy: {} (tunnel {})\n",
            tunnel.socket.display(),
            tunnel.detail
        )),
        (None, Egress::Allow(_)) => out.push_str("proxy: not running (the VM is not running)\n"),
        _ => {}
    }
    if report.connections.is_empty() {
        if matches!(report.policy, Egress::Allow(_)) {
            out.push_str("no connections yet\n");
        }
        return out;
    }
    for event in &report.connections {
        out.push_str(&format!(
            "{}  {:8}  {}:{}  {}\n",
            format_time(UNIX_EPOCH + Duration::from_secs(event.at)),
            if event.admitted {
                "admitted"
            } else {
                "REFUSED"
            },
            event.host,
            event.port,
            event.note
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress_proxy::EgressEvent;

    #[test]
    fn text_names_policy_and_refusals() {
        let report = EgressReport {
            policy: Egress::Allow(vec!["github.com:443".parse().unwrap()]),
            tunnel: None,
            connections: vec![EgressEvent {
                at: 0,
                host: "evil.example".into(),
                port: 443,
                admitted: false,
                note: "not in the allow list".into(),
            }],
        };
        let shown = text("web", &report);
        assert!(shown.starts_with("web: egress [github.com:443]"), "{shown}");
        assert!(shown.contains("proxy: not running"), "{shown}");
        assert!(
            shown.contains(
                "1970-01-01T00:00:00Z  REFUSED   evil.example:443  not in the allow list"
            ),
            "{shown}"
        );
    }
}
