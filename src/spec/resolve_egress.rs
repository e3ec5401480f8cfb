//! Resolving `egress` (per VM, else `[defaults]`) into an [`Egress`], with
//! errors naming the entry (`vms.NAME.egress[2]`) and its line.

use toml::Spanned;

use super::raw::RawEgress;
use super::resolve::Locator;
use super::{Egress, EgressRule, LOCAL_BACKEND, Name, SpecError};

/// The VM's `egress`, else the default's; `open` when neither says.
pub(super) fn resolve(
    at: &Locator,
    name: &Name,
    backend: &str,
    own: Option<&Spanned<RawEgress>>,
    default: Option<&Spanned<RawEgress>>,
) -> Result<Egress, SpecError> {
    let (value, field) = match (own, default) {
        (Some(v), _) => (v, format!("vms.{name}.egress")),
        (None, Some(d)) => (d, "defaults.egress".to_string()),
        (None, None) => return Ok(Egress::Open),
    };
    let egress = match value.get_ref() {
        RawEgress::Word(word) => match word.as_str() {
            "open" => Egress::Open,
            "none" => Egress::None,
            other => {
                return Err(at.error(
                    Some(value.span()),
                    &field,
                    format!(
                        "unknown egress {other:?}: expected \"open\", \"none\" or a list of \"HOST:PORT\" entries"
                    ),
                ));
            }
        },
        RawEgress::List(entries) => {
            let mut rules: Vec<EgressRule> = Vec::new();
            for (i, entry) in entries.iter().enumerate() {
                let fail = |message: String| {
                    at.error(Some(entry.span()), &format!("{field}[{i}]"), message)
                };
                let rule = EgressRule::parse(entry.get_ref()).map_err(fail)?;
                if rules.contains(&rule) {
                    return Err(fail(format!("{rule} is listed twice")));
                }
                rules.push(rule);
            }
            Egress::Allow(rules)
        }
    };
    if backend != LOCAL_BACKEND && !egress.is_open() {
        return Err(at.error(
            Some(value.span()),
            &field,
            format!(
                "VM {name} is on backend {backend:?}: agentvm enforces egress only for local VMs; \
                 restrict a Proxmox VM with Proxmox firewall rules (set egress = \"open\" on this VM to override [defaults])"
            ),
        ));
    }
    Ok(egress)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::spec::{Egress, Fleet, SpecError};

    const IMAGES: &str = "[images.deb]\nfile = \"/images/deb.qcow2\"\n";

    fn parse(text: &str) -> Result<Fleet, SpecError> {
        Fleet::parse(Path::new("/fleet/agentvm.toml"), &format!("{IMAGES}{text}"))
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn vms_take_the_default_or_their_own() {
        let fleet = parse(
            "[defaults]\negress = \"none\"\n[vms.a]\nimage = \"deb\"\n\
             [vms.b]\nimage = \"deb\"\negress = [\"github.com:443\", \"*.crates.io:443\"]\n\
             [vms.c]\nimage = \"deb\"\negress = \"open\"\n",
        )
        .unwrap();
        assert_eq!(fleet.vms["a"].egress, Egress::None);
        assert_eq!(
            fleet.vms["b"].egress.to_string(),
            "[github.com:443, *.crates.io:443]"
        );
        assert_eq!(fleet.vms["c"].egress, Egress::Open);
        let plain = parse("[vms.d]\nimage = \"deb\"\n").unwrap();
        assert_eq!(plain.vms["d"].egress, Egress::Open);
    }

    #[test]
    fn bad_entries_name_file_line_and_entry() {
        // Lines: 1-2 are the image, 3 [vms.a], 4 image, 5 egress.
        let vm = |egress: &str| format!("[vms.a]\nimage = \"deb\"\negress = {egress}\n");
        for (egress, says) in [
            (
                r#"["github.com:443", "github.com"]"#,
                "vms.a.egress[1]: \"github.com\" has no port",
            ),
            (
                r#"["a.io:443", "b.io:1", "c.io:70000"]"#,
                "vms.a.egress[2]: \"c.io:70000\": port 70000 is out of range",
            ),
            (r#"[":443"]"#, "vms.a.egress[0]: \":443\" has an empty host"),
            (r#"["open"]"#, "vms.a.egress[0]: \"open\" is a whole policy"),
            (
                r#"["api.*.github.com:443"]"#,
                "vms.a.egress[0]: \"api.*.github.com:443\": a wildcard may only start",
            ),
            (
                r#"["a.io:443", "A.io:443"]"#,
                "vms.a.egress[1]: a.io:443 is listed twice",
            ),
            (r#""closed""#, "vms.a.egress: unknown egress \"closed\""),
        ] {
            let err = error(&vm(egress));
            assert!(err.starts_with("/fleet/agentvm.toml:5:"), "{egress}: {err}");
            assert!(err.contains(says), "{egress}: {err}");
        }
        let err = error("[defaults]\negress = [\"x.io\"]\n[vms.a]\nimage = \"deb\"\n");
        assert!(
            err.contains(":4:") && err.contains("defaults.egress[0]"),
            "{err}"
        );
        assert!(error(&vm("3")).contains("vms.a.egress"));
    }

    #[test]
    fn proxmox_vms_refuse_egress_other_than_open() {
        let backend = "[backends.lab]\nkind = \"proxmox\"\nendpoint = \"https://pve:8006\"\n\
                       node = \"pve\"\ntoken = { env = \"T\" }\ntemplate = 9000\n";
        let err = error(&format!(
            "{backend}[vms.r]\nbackend = \"lab\"\negress = \"none\"\n"
        ));
        assert!(
            err.contains("vms.r.egress") && err.contains("Proxmox firewall"),
            "{err}"
        );
        let fleet = parse(&format!(
            "{backend}[defaults]\negress = \"none\"\n[vms.r]\nbackend = \"lab\"\negress = \"open\"\n"
        ))
        .unwrap();
        assert_eq!(fleet.vms["r"].egress, Egress::Open);
    }
}
