//! Templates from agentvm images and which template a VM is cloned from. A
//! pushed template carries its content address in its description
//! ([`TemplateMarker`]) and the tag `agentvm`; VMs of the image are cloned from
//! its newest template.

use std::time::UNIX_EPOCH;

use anyhow::anyhow;

use super::{ProxmoxBackend, TemplateMarker, pve};
use crate::backend::Result;
use crate::spec::VmSpec;

/// The tag of every template `image push` makes.
const TAG: &str = "agentvm";
/// A template `image push` made, wherever it is in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PushedTemplate {
    pub vmid: u32,
    pub node: String,
    pub marker: TemplateMarker,
}

/// The template a new VM is cloned from, and why that one.
#[derive(Debug, Clone)]
pub(super) struct Source {
    pub vmid: u32,
    pub node: String,
    pub why: String,
}

/// The newest template of `image` by its push time (the higher VMID on a tie).
fn newest<'a>(templates: &'a [PushedTemplate], image: &str) -> Option<&'a PushedTemplate> {
    templates
        .iter()
        .filter(|t| t.marker.image == image)
        .max_by_key(|t| (t.marker.pushed, t.vmid))
}

impl ProxmoxBackend {
    /// Every template `image push` made, anywhere in the cluster (templates on
    /// offline nodes left out: their config cannot be read).
    pub(super) fn pushed_templates(&self) -> Result<Vec<PushedTemplate>> {
        let mut out = Vec::new();
        for r in self.resources()? {
            let tagged = r["tags"]
                .as_str()
                .is_none_or(|tags| tags.split([';', ',', ' ']).any(|t| t == TAG));
            // Containers' templates are not agentvm's; offline nodes' cannot be read.
            if r["type"] != "qemu" || r["template"] != 1 || r["status"] == "unknown" || !tagged {
                continue;
            }
            let (Some(vmid), Some(node)) = (r["vmid"].as_u64(), r["node"].as_str()) else {
                continue;
            };
            let config = self
                .client
                .get(&Self::vm_path(node, vmid as u32, "/config"), &[])
                .map_err(pve)?;
            if let Some(marker) = config["description"]
                .as_str()
                .and_then(TemplateMarker::parse)
            {
                out.push(PushedTemplate {
                    vmid: vmid as u32,
                    node: node.to_string(),
                    marker,
                });
            }
        }
        Ok(out)
    }

    /// The template a new VM of `spec` is cloned from: the newest pushed
    /// template of its image, else the backend's `template`.
    pub(super) fn template(&self, spec: &VmSpec) -> Result<Source> {
        if let Some(image) = &spec.image
            && let Some(t) = newest(&self.pushed_templates()?, image.as_str())
        {
            return Ok(Source {
                vmid: t.vmid,
                node: t.node.clone(),
                why: format!(
                    "image {image} as pushed at {} ({})",
                    crate::clock::format_time(
                        UNIX_EPOCH + std::time::Duration::from_secs(t.marker.pushed)
                    ),
                    t.marker.digest.chars().take(19).collect::<String>()
                ),
            });
        }
        let b = &self.name;
        let Some(wanted) = &self.spec.template else {
            return Err(match &spec.image {
                Some(image) => anyhow!(
                    "image {image} is not on backend {b}: agentvm image push {image} --backend {b}"
                ),
                None => anyhow!(
                    "vms.{}: no image, and backends.{b}.template is not set: give the VM an image \
                     (then agentvm image push IMAGE --backend {b}) or the backend a template",
                    spec.name
                ),
            }
            .into());
        };
        let (vmid, node) = self.configured_template(wanted)?;
        let why = match &spec.image {
            Some(image) => format!("backends.{b}.template (image {image} was not pushed here)"),
            None => format!("backends.{b}.template"),
        };
        Ok(Source { vmid, node, why })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pushed(vmid: u32, image: &str, digest: &str, at: u64) -> PushedTemplate {
        PushedTemplate {
            vmid,
            node: "pve".into(),
            marker: TemplateMarker {
                image: image.into(),
                digest: digest.into(),
                pushed: at,
            },
        }
    }

    #[test]
    fn the_newest_push_of_an_image_is_chosen() {
        let all = [
            pushed(9001, "nixos", "sha256:aa", 100),
            pushed(9002, "nixos", "sha256:bb", 300),
            pushed(9003, "debian", "sha256:cc", 500),
            pushed(9004, "nixos", "sha256:aa", 200),
        ];
        assert_eq!(newest(&all, "nixos").unwrap().vmid, 9002);
        assert_eq!(newest(&all, "debian").unwrap().vmid, 9003);
        assert!(newest(&all, "alpine").is_none());
    }
}
