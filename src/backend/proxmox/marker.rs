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
}

impl Marker {
    pub fn render(&self, purpose: Option<&str>) -> String {
        let mut text = format!(
            "{MARKER}\nspec-hash: {}\nreadonly: {}\nuser: {}\n",
            self.spec_hash, self.readonly, self.user
        );
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
        };
        let text = m.render(Some("builds"));
        assert!(text.starts_with("agentvm: managed\n"));
        assert_eq!(Marker::parse(&text), Some(m));
        assert_eq!(Marker::parse("my own VM"), None);
    }
}
