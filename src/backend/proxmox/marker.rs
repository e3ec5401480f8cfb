//! What agentvm keeps in a Proxmox VM's description: the marker that says the
//! VM is agentvm's, and the state it needs (spec hash, readonly, login user);
//! and on templates made by `image push`, the image and digest they hold.
//! Proxmox itself is the state store: nothing about a remote VM lives only in
//! agentvm's files.

/// First line of the description of every VM agentvm manages on Proxmox.
pub const MARKER: &str = "agentvm: managed";
/// First line of the description of every template `image push` made.
pub const TEMPLATE_MARKER: &str = "agentvm: template";

/// What a pushed template's description records: its content address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateMarker {
    pub image: String,
    /// `sha256:<hex>` of the image's disk.
    pub digest: String,
    /// Unix time of the push.
    pub pushed: u64,
}

impl TemplateMarker {
    pub fn render(&self) -> String {
        format!(
            "{TEMPLATE_MARKER}\nimage: {}\ndigest: {}\npushed: {}\n",
            self.image, self.digest, self.pushed
        )
    }

    /// The marker of a description, if it is a whole one.
    pub fn parse(description: &str) -> Option<Self> {
        let mut lines = description.lines();
        if lines.next()?.trim() != TEMPLATE_MARKER {
            return None;
        }
        let (mut image, mut digest, mut pushed) = (None, None, None);
        for line in lines {
            match line.split_once(": ") {
                Some(("image", v)) => image = Some(v.trim().to_string()),
                Some(("digest", v)) => digest = Some(v.trim().to_string()),
                Some(("pushed", v)) => pushed = v.trim().parse().ok(),
                _ => {}
            }
        }
        Some(Self {
            image: image.filter(|i| !i.is_empty())?,
            digest: digest.filter(|d| d.starts_with("sha256:"))?,
            pushed: pushed?,
        })
    }
}

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

    #[test]
    fn template_marker_round_trips_and_is_no_vm_marker() {
        let m = TemplateMarker {
            image: "nixos".into(),
            digest: "sha256:0123abcd".into(),
            pushed: 1_700_000_000,
        };
        let text = m.render();
        assert_eq!(
            text,
            "agentvm: template\nimage: nixos\ndigest: sha256:0123abcd\npushed: 1700000000\n"
        );
        assert_eq!(TemplateMarker::parse(&text), Some(m));
        assert_eq!(Marker::parse(&text), None, "a template is not a managed VM");
        assert_eq!(
            TemplateMarker::parse("agentvm: managed\nspec-hash: x\n"),
            None
        );
        // Half a marker (edited by hand) is none.
        assert_eq!(
            TemplateMarker::parse("agentvm: template\nimage: nixos\npushed: 1\n"),
            None
        );
    }
}
