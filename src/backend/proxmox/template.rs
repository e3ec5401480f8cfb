//! Templates from agentvm images (`agentvm image push`): the image's disk from
//! this machine's store is uploaded to a storage with `import` content, a VM is
//! created that imports it, and the VM is made a template. Each template
//! carries its content address in its description ([`TemplateMarker`]) and the
//! tag `agentvm`, so a push of an unchanged image is a no-op, and VMs of the
//! image are cloned from its newest template.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use serde_json::Value;

use super::storage::pick;
use super::{ProxmoxBackend, PveError, TemplateMarker, pve};
use crate::backend::{DiskSource, PushAction, Pushed, Result, Templates};
use crate::image::BaseDisk;
use crate::progress::Reporter;
use crate::spec::{DEFAULT_BRIDGE, ImageSpec, TemplateRef, VmSpec};

/// The tag of every template `image push` makes.
const TAG: &str = "agentvm";
/// Cores and memory of a pushed template; every clone gets its spec's.
const TEMPLATE_CORES: &str = "2";
const TEMPLATE_MEMORY_MIB: &str = "2048";
/// Attempts at a fresh VMID when another client takes ours in between.
const NEXTID_ATTEMPTS: u32 = 5;

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

/// A template of `image` made from the disk with `digest`, if one was pushed.
fn same<'a>(
    templates: &'a [PushedTemplate],
    image: &str,
    digest: &str,
) -> Option<&'a PushedTemplate> {
    templates
        .iter()
        .filter(|t| t.marker.image == image && t.marker.digest == digest)
        .max_by_key(|t| (t.marker.pushed, t.vmid))
}

/// The file name of the upload: `agentvm-<image>-<12 hex of the digest>.<format>`.
fn upload_name(image: &str, digest: &str, format: &str) -> String {
    let hex: String = digest
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect();
    format!("agentvm-{image}-{hex}.{format}")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a failed step of a push says.
fn at_step(step: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("image push failed at {step}: {e:#}")
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
        let setting = match wanted {
            TemplateRef::Id(_) => format!("backends.{b}.template"),
            TemplateRef::Name(name) => format!("backends.{b}.template {name:?}"),
        };
        let why = match &spec.image {
            Some(image) => format!("{setting} (image {image} was not pushed here)"),
            None => setting,
        };
        Ok(Source { vmid, node, why })
    }

    /// Uploads the disk to `storage` on `node`; returns its volume ID.
    fn upload(
        &self,
        (node, storage): (&str, &str),
        disk: &BaseDisk,
        file_name: &str,
        progress: &dyn Reporter,
        label: &str,
    ) -> anyhow::Result<String> {
        let file = std::fs::File::open(&disk.file.path)
            .with_context(|| format!("opening {}", disk.file.path.display()))?;
        let size = file.metadata()?.len();
        let hex = disk.file.digest.trim_start_matches("sha256:").to_string();
        progress.step(
            label,
            &format!("uploading {file_name} to storage {storage} on node {node}"),
        );
        let upid = self.client.upload(
            &format!("/nodes/{node}/storage/{storage}/upload"),
            &[
                ("content", "import".to_string()),
                ("checksum-algorithm", "sha256".to_string()),
                ("checksum", hex),
            ],
            (file, size, file_name),
            progress,
            &format!("uploading {file_name}"),
        )?;
        if let Err(e) = self.client.wait_task(&upid, "upload", progress, label) {
            if format!("{e:#}").contains("checksum mismatch") {
                return Err(anyhow!(
                    "the upload arrived damaged: Proxmox computed another sha256 than {} has \
                     (checksum mismatch); Proxmox kept nothing of it, push again: {e:#}",
                    disk.file.path.display()
                ));
            }
            return Err(e);
        }
        Ok(format!("{storage}:import/{file_name}"))
    }

    /// Creates the VM that imports `volume` (not sent again blindly: a VMID
    /// taken meanwhile gets a fresh one); returns its VMID.
    fn create_importing(
        &self,
        node: &str,
        params: &[(&'static str, String)],
        progress: &dyn Reporter,
        label: &str,
    ) -> anyhow::Result<u32> {
        let name = params
            .iter()
            .find(|(key, _)| *key == "name")
            .map_or("", |(_, value)| value.as_str());
        for attempt in 1..=NEXTID_ATTEMPTS {
            let next = self.client.get("/cluster/nextid", &[])?;
            let vmid = next
                .as_u64()
                .or_else(|| next.as_str().and_then(|s| s.parse().ok()))
                .context("nextid returned no number")? as u32;
            let mut all = vec![("vmid", vmid.to_string())];
            all.extend(params.iter().cloned());
            progress.step(label, &format!("creating VM {vmid} on node {node}"));
            match self.client.post_once(&format!("/nodes/{node}/qemu"), &all) {
                Ok(upid) => {
                    if let Err(e) = self.client.wait_task(&upid, "create", progress, label) {
                        // PVE removes a VM whose creation failed; make sure.
                        self.remove_half_made((node, vmid, name), progress, label);
                        return Err(e);
                    }
                    return Ok(vmid);
                }
                Err(PveError::Api { message, .. })
                    if message.contains("already exists") && attempt < NEXTID_ATTEMPTS =>
                {
                    progress.step(label, &format!("vmid {vmid} was taken meanwhile"));
                }
                Err(e) if e.outcome_unknown() => {
                    // It may have been made: remove whatever holds our name there.
                    self.remove_half_made((node, vmid, name), progress, label);
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(anyhow!("no free vmid after {NEXTID_ATTEMPTS} attempts"))
    }

    /// Removes VM `vmid` if it is there under `name`, the one this push made.
    fn remove_half_made(
        &self,
        (node, vmid, name): (&str, u32, &str),
        progress: &dyn Reporter,
        label: &str,
    ) {
        let ours = self.resources().is_ok_and(|list| {
            list.iter()
                .any(|r| r["vmid"].as_u64() == Some(u64::from(vmid)) && r["name"] == name)
        });
        if ours && let Err(e) = self.purge(node, vmid, progress, label) {
            progress.step(
                label,
                &format!("warning: removing the half-made VM {vmid} failed: {e:#}"),
            );
        }
    }

    /// Deletes the uploaded volume; a failure is a warning (it only takes space).
    fn delete_upload(&self, node: &str, volume: &str, progress: &dyn Reporter, label: &str) {
        let storage = volume.split(':').next().unwrap_or_default();
        let encoded =
            percent_encoding::utf8_percent_encode(volume, percent_encoding::NON_ALPHANUMERIC);
        let deleted = self
            .client
            .delete(
                &format!("/nodes/{node}/storage/{storage}/content/{encoded}"),
                &[],
            )
            .map_err(anyhow::Error::from)
            .and_then(|reply| match reply {
                Value::Null => Ok(()),
                upid => self
                    .client
                    .wait_task(&upid, "removing the upload", progress, label),
            });
        if let Err(e) = deleted {
            progress.step(
                label,
                &format!(
                    "warning: the uploaded {volume} was not removed ({e:#}); remove it by hand \
                     (it is not needed any more)"
                ),
            );
        }
    }

    /// The `POST /nodes/{node}/qemu` parameters (but `vmid`) of the template of
    /// `image`, its disk imported from `volume` onto `vm_storage`.
    fn template_params(
        &self,
        image: &ImageSpec,
        marker: &TemplateMarker,
        vm_storage: &str,
        volume: &str,
    ) -> Vec<(&'static str, String)> {
        let bridge = self.spec.bridge.as_deref().unwrap_or(DEFAULT_BRIDGE);
        let mut params = vec![
            ("name", format!("agentvm-{}", image.name)),
            ("scsi0", format!("{vm_storage}:0,import-from={volume}")),
            ("scsihw", "virtio-scsi-single".to_string()),
            ("net0", format!("virtio,bridge={bridge}")),
            ("agent", if image.agent { "1" } else { "0" }.to_string()),
            ("ostype", "l26".to_string()),
            ("serial0", "socket".to_string()),
            // SPICE, for `agentvm spice`.
            ("vga", "qxl".to_string()),
            ("ide2", format!("{vm_storage}:cloudinit")),
            ("boot", "order=scsi0".to_string()),
            ("cores", TEMPLATE_CORES.to_string()),
            ("memory", TEMPLATE_MEMORY_MIB.to_string()),
            ("description", marker.render()),
            ("tags", TAG.to_string()),
        ];
        if let Some(pool) = &self.spec.pool {
            params.push(("pool", pool.clone()));
        }
        params
    }

    /// After the upload: create the VM, make it a template. On error the VM is
    /// removed again; the upload is removed either way.
    fn make_template(
        &self,
        node: &str,
        params: &[(&'static str, String)],
        progress: &dyn Reporter,
        label: &str,
    ) -> anyhow::Result<u32> {
        let vmid = self
            .create_importing(node, params, progress, label)
            .map_err(|e| at_step("creating the VM that imports the disk", e))?;
        let converted = self
            .client
            .post(&Self::vm_path(node, vmid, "/template"), &[])
            .map_err(anyhow::Error::from)
            .and_then(|upid| {
                self.client
                    .wait_task(&upid, "making the template", progress, label)
            });
        if let Err(e) = converted {
            let e = at_step(&format!("making VM {vmid} a template"), e);
            return Err(match self.purge(node, vmid, progress, label) {
                Ok(()) => e,
                Err(cleanup) => anyhow!("{e:#}; removing VM {vmid} failed too: {cleanup:#}"),
            });
        }
        Ok(vmid)
    }
}

impl Templates for ProxmoxBackend {
    fn push_image(
        &self,
        image: &ImageSpec,
        disk: DiskSource<'_>,
        progress: &dyn Reporter,
    ) -> Result<Pushed> {
        let label = format!("image:{}", image.name);
        let disk = disk()?;
        let digest = disk.file.digest.clone();
        if let Some(t) = same(&self.pushed_templates()?, image.name.as_str(), &digest) {
            progress.step(
                &label,
                &format!(
                    "template {} on node {} already holds {digest}",
                    t.vmid, t.node
                ),
            );
            return Ok(Pushed {
                vmid: t.vmid,
                node: t.node.clone(),
                digest,
                action: PushAction::Unchanged,
            });
        }
        let node = self.placement_node()?;
        let storages = self.node_storages(&node)?;
        let field = |key: &str| format!("backends.{}.{key}", self.name);
        let import = pick(
            &storages,
            "import",
            (
                &field("import_storage"),
                self.spec.import_storage.as_deref(),
            ),
            &node,
        )
        .map_err(|e| anyhow!(e))?;
        let vm_storage = pick(
            &storages,
            "images",
            (&field("storage"), self.spec.storage.as_deref()),
            &node,
        )
        .map_err(|e| anyhow!(e))?;
        let file_name = upload_name(image.name.as_str(), &digest, disk.format.as_str());
        let volume = self
            .upload((&node, &import), &disk, &file_name, progress, &label)
            .map_err(|e| at_step(&format!("uploading to storage {import}"), e))?;
        let marker = TemplateMarker {
            image: image.name.to_string(),
            digest: digest.clone(),
            pushed: now(),
        };
        let params = self.template_params(image, &marker, &vm_storage, &volume);
        let made = self.make_template(&node, &params, progress, &label);
        self.delete_upload(&node, &volume, progress, &label);
        let vmid = made?;
        Ok(Pushed {
            vmid,
            node,
            digest,
            action: PushAction::Pushed,
        })
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
    fn the_newest_push_of_an_image_is_chosen_and_a_same_digest_found() {
        let all = [
            pushed(9001, "nixos", "sha256:aa", 100),
            pushed(9002, "nixos", "sha256:bb", 300),
            pushed(9003, "debian", "sha256:cc", 500),
            pushed(9004, "nixos", "sha256:aa", 200),
        ];
        assert_eq!(newest(&all, "nixos").unwrap().vmid, 9002);
        assert_eq!(newest(&all, "debian").unwrap().vmid, 9003);
        assert!(newest(&all, "alpine").is_none());
        assert_eq!(same(&all, "nixos", "sha256:aa").unwrap().vmid, 9004);
        assert!(
            same(&all, "nixos", "sha256:cc").is_none(),
            "another image's"
        );
        assert!(same(&all, "debian", "sha256:aa").is_none());
    }

    #[test]
    fn upload_names_carry_the_image_and_digest() {
        assert_eq!(
            upload_name("nixos", "sha256:0123456789abcdef0123", "qcow2"),
            "agentvm-nixos-0123456789ab.qcow2"
        );
        assert_eq!(upload_name("x", "sha256:ab", "raw"), "agentvm-x-ab.raw");
    }
}
