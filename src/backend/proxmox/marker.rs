//! What agentvm keeps in a Proxmox VM's description: the marker that says the
//! VM is agentvm's, and the state it needs (spec hash, readonly, login user).
//! Proxmox itself is the state store: nothing about a remote VM lives only in
//! agentvm's files.

/// First line of the description of every VM agentvm manages on Proxmox.
pub const MARKER: &str = "agentvm: managed";

/// What agentvm keeps in a Proxmox VM's description.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marker {
    pub spec_hash: String,
    pub readonly: bool,
    pub user: String,
    /// The guest file of the SSH host key, when the image names another than
    /// the default.
    pub host_key: Option<String>,
    /// The host `ssh` connects to, when the spec pins one.
    pub ssh_host: Option<String>,
}

impl Marker {
    pub fn render(&self, purpose: Option<&str>) -> String {
        let mut text = format!(
            "{MARKER}\nspec-hash: {}\nreadonly: {}\nuser: {}\n",
            self.spec_hash, self.readonly, self.user
        );
        if let Some(path) = &self.host_key {
            text.push_str(&format!("host-key: {path}\n"));
        }
        if let Some(host) = &self.ssh_host {
            text.push_str(&format!("ssh-host: {host}\n"));
        }
        if let Some(purpose) = purpose {
            text.push_str(&format!("purpose: {purpose}\n"));
        }
        text
    }

    pub fn parse(description: &str) -> Option<Self> {
        let mut lines = description.lines();
        if lines.next()?.trim() != MARKER {
            return None;
        }
        let mut marker = Marker::default();
        for line in lines {
            match line.split_once(": ") {
                Some(("spec-hash", v)) => marker.spec_hash = v.trim().to_string(),
                Some(("readonly", v)) => marker.readonly = v.trim() == "true",
                Some(("user", v)) => marker.user = v.trim().to_string(),
                Some(("host-key", v)) => marker.host_key = Some(v.trim().to_string()),
                Some(("ssh-host", v)) => marker.ssh_host = Some(v.trim().to_string()),
                _ => {}
            }
        }
        Some(marker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips() {
        let m = Marker {
            spec_hash: "sha256:ab".into(),
            readonly: true,
            user: "agent".into(),
            host_key: Some("/etc/ssh/ssh_host_rsa_key.pub".into()),
            ssh_host: Some("agent.lan".into()),
        };
        let text = m.render(Some("builds"));
        assert!(text.starts_with("agentvm: managed\n"));
        assert_eq!(Marker::parse(&text), Some(m));
        assert_eq!(Marker::parse("my own VM"), None);
    }
}
