//! Resolving `[backends.NAME]` tables into Proxmox backend specs.

use super::raw;
use super::resolve::Resolver;
use super::*;

impl Resolver<'_> {
    pub(super) fn backend(
        &self,
        name: &Name,
        raw: raw::RawBackend,
    ) -> Result<ProxmoxSpec, SpecError> {
        let field = |key: &str| format!("backends.{name}.{key}");
        if raw.kind.get_ref() != "proxmox" {
            return Err(self.at.error(
                Some(raw.kind.span()),
                &field("kind"),
                format!(
                    "unknown backend kind {:?} (known: proxmox)",
                    raw.kind.get_ref()
                ),
            ));
        }
        let endpoint = raw.endpoint.get_ref().trim_end_matches('/').to_string();
        let bad_endpoint = |why: &str| {
            self.at.error(
                Some(raw.endpoint.span()),
                &field("endpoint"),
                why.to_string(),
            )
        };
        match endpoint.split_once("://") {
            Some(("https", host)) if !host.is_empty() => {}
            Some(("http", host)) if is_loopback_host(host) => {}
            Some(("http", _)) => {
                return Err(bad_endpoint(
                    "plain http:// is only allowed for loopback endpoints; use https://",
                ));
            }
            _ => return Err(bad_endpoint("expected https://host:8006")),
        }
        let token = match (raw.token.env, raw.token.file) {
            (Some(var), None) => TokenSource::Env(var),
            (None, Some(path)) => TokenSource::File(self.path(&path)),
            _ => {
                return Err(self.at.error(
                    self.key_span("backends", name.as_str()),
                    &field("token"),
                    "token is { env = \"VAR\" } or { file = \"path\" }".into(),
                ));
            }
        };
        let (fingerprint, insecure) = match raw.tls {
            Some(tls) => (
                tls.fingerprint.or(raw.fingerprint),
                tls.insecure || raw.insecure,
            ),
            None => (raw.fingerprint, raw.insecure),
        };
        let tls = match (fingerprint, insecure) {
            (Some(_), true) => {
                return Err(self.at.error(
                    self.key_span("backends", name.as_str()),
                    &field("tls"),
                    "set either fingerprint or insecure, not both".into(),
                ));
            }
            (Some(fp), false) => {
                let hex: String = fp.get_ref().chars().filter(|c| *c != ':').collect();
                if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(self.at.error(
                        Some(fp.span()),
                        &field("fingerprint"),
                        "expected a SHA-256 fingerprint like \"AA:BB:…\" (32 bytes)".into(),
                    ));
                }
                TlsMode::Fingerprint(hex.to_ascii_uppercase())
            }
            (None, true) => TlsMode::Insecure,
            (None, false) => TlsMode::Verified,
        };
        // As PVE's `pve-storage-id` and `pve-bridge-id` formats say.
        let storage_id = |s: &str| {
            s.len() >= 2
                && s.starts_with(|c: char| c.is_ascii_lowercase())
                && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && s.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
                })
        };
        let bridge_id = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        for (key, value, valid, what) in [
            (
                "import_storage",
                &raw.import_storage,
                &storage_id as &dyn Fn(&str) -> bool,
                "a storage ID like \"local\"",
            ),
            ("bridge", &raw.bridge, &bridge_id, "a bridge like \"vmbr0\""),
        ] {
            if let Some(value) = value
                && !valid(value)
            {
                return Err(self.at.error(
                    self.key_span("backends", name.as_str()),
                    &field(key),
                    format!("invalid value {value:?}: expected {what}"),
                ));
            }
        }
        Ok(ProxmoxSpec {
            endpoint,
            node: raw.node,
            token,
            template: raw.template.map(|t| match t {
                raw::RawTemplate::Id(id) => TemplateRef::Id(id),
                raw::RawTemplate::Name(n) => TemplateRef::Name(n),
            }),
            storage: raw.storage,
            import_storage: raw.import_storage,
            bridge: raw.bridge,
            pool: raw.pool,
            full_clone: raw.full_clone,
            tls,
            ssh_port: raw.ssh_port.unwrap_or(22),
        })
    }
}

/// `127.0.0.1:8006`, `localhost`, `[::1]:8006`…
fn is_loopback_host(authority: &str) -> bool {
    let host = authority.split('/').next().unwrap_or("");
    let host = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
