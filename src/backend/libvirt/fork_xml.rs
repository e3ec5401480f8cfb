//! The domain XML of a fork: the XML saved with the source's memory, with
//! only what identifies a VM changed (name, UUID, agentvm metadata, its files,
//! sockets and ports). Devices and their PCI addresses stay as saved, so the
//! migration stream restores into the same machine.

use anyhow::{Context, Result, bail};

use crate::domain::{GUEST_SSH_PORT, LISTEN_ADDRESS, VmState, domain_name};

/// What changes from the source's XML to a fork's.
pub struct ForkIdentity<'a> {
    /// The source's metadata, as the saved XML holds it.
    pub source: &'a VmState,
    /// The fork's metadata (name, ports, layer…).
    pub fork: &'a VmState,
    /// The disk the saved XML writes to (the frozen layer) and the fork's.
    pub disk: (String, String),
    /// Other whole-path replacements: (source's file or socket, fork's).
    pub paths: Vec<(String, String)>,
}

/// The fork's XML, without a `<uuid>` (libvirt gives a defined domain one;
/// [`with_uuid`] puts it into the XML the fork is restored from).
pub fn rewrite(saved: &str, id: &ForkIdentity<'_>) -> Result<String> {
    let mut xml = replace_once(
        saved,
        &format!("<name>{}</name>", domain_name(&id.source.name)),
        &format!("<name>{}</name>", domain_name(&id.fork.name)),
    )
    .context("the saved XML has no domain name of the source")?;
    xml = without_element(&xml, "uuid")?;
    xml = with_metadata(&xml, id.fork)?;
    // The fork must never write to the layer it shares.
    let (from, to) = &id.disk;
    xml = replace_once(&xml, &format!("file='{from}'"), &format!("file='{to}'"))
        .context("the saved XML has no disk on the frozen layer")?;
    for (from, to) in &id.paths {
        xml = xml.replace(&format!("'{from}'"), &format!("'{to}'"));
    }
    xml = with_spice_port(&xml, id.source.spice_port, id.fork.spice_port)?;
    xml = with_netdev(&xml, id.source, id.fork)?;
    Ok(xml)
}

/// `xml` with `<uuid>uuid</uuid>` after its `<name>`.
pub fn with_uuid(xml: &str, uuid: &str) -> Result<String> {
    let end = xml
        .find("</name>")
        .context("the domain XML has no <name>")?
        + "</name>".len();
    Ok(format!(
        "{}\n  <uuid>{uuid}</uuid>{}",
        &xml[..end],
        &xml[end..]
    ))
}

fn replace_once(xml: &str, from: &str, to: &str) -> Result<String> {
    if !xml.contains(from) {
        bail!("{from} not found");
    }
    Ok(xml.replacen(from, to, 1))
}

/// `xml` without the first `<tag>…</tag>`.
fn without_element(xml: &str, tag: &str) -> Result<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let Some(start) = xml.find(&open) else {
        return Ok(xml.to_string());
    };
    let end = xml[start..]
        .find(&close)
        .with_context(|| format!("unterminated <{tag}> in the saved XML"))?
        + start
        + close.len();
    Ok(format!("{}{}", &xml[..start], &xml[end..]))
}

/// `xml` with the agentvm metadata element replaced by `state`'s.
fn with_metadata(xml: &str, state: &VmState) -> Result<String> {
    const OPEN: &str = "<agentvm:vm";
    const CLOSE: &str = "</agentvm:vm>";
    let start = xml
        .find(OPEN)
        .context("the saved XML has no agentvm metadata")?;
    let end = xml[start..]
        .find(CLOSE)
        .context("unterminated agentvm metadata in the saved XML")?
        + start
        + CLOSE.len();
    let element = quick_xml::se::to_string_with_root("agentvm:vm", state)
        .context("writing agentvm metadata")?;
    Ok(format!("{}{element}{}", &xml[..start], &xml[end..]))
}

/// The SPICE listener's port.
fn with_spice_port(xml: &str, from: u16, to: u16) -> Result<String> {
    let start = xml
        .find("<graphics type='spice'")
        .context("the saved XML has no SPICE display")?;
    let tag_end = xml[start..].find('>').context("unterminated <graphics>")? + start;
    let tag = &xml[start..tag_end];
    let old = format!("port='{from}'");
    if !tag.contains(&old) {
        bail!("the SPICE display is not on port {from} in the saved XML");
    }
    let tag = tag.replacen(&old, &format!("port='{to}'"), 1);
    Ok(format!("{}{tag}{}", &xml[..start], &xml[tag_end..]))
}

/// The SLIRP netdev: the fork's SSH port, without the source's port forwards
/// (their host ports are the source's).
fn with_netdev(xml: &str, source: &VmState, fork: &VmState) -> Result<String> {
    let ssh = |port: u16| format!("hostfwd=tcp:{LISTEN_ADDRESS}:{port}-:{GUEST_SSH_PORT}");
    let mut xml = replace_once(xml, &ssh(source.ssh_port), &ssh(fork.ssh_port))
        .context("the saved XML has no SSH forward of the source")?;
    for forward in source.forwards.iter().filter(|f| !f.live) {
        xml = xml.replacen(&format!(",hostfwd={}", forward.forward().hostfwd()), "", 1);
    }
    Ok(xml)
}

/// `xml` without `<backingStore>` elements: libvirt then reads each disk's
/// chain from its qcow2 headers (a fork's overlay sits on a layer the saved
/// chain does not name).
pub(super) fn without_backing_stores(xml: &str) -> Result<String> {
    const OPEN: &str = "<backingStore";
    const CLOSE: &str = "</backingStore>";
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        let mut depth = 0usize;
        let mut at = start;
        loop {
            let next_open = rest[at..].find(OPEN).map(|i| i + at);
            let next_close = rest[at..].find(CLOSE).map(|i| i + at);
            match (next_open, next_close) {
                (Some(open), close) if close.is_none_or(|c| open < c) => {
                    let tag_end = rest[open..]
                        .find('>')
                        .map(|i| i + open)
                        .context("unterminated <backingStore> in the saved XML")?;
                    at = tag_end + 1;
                    if rest[..tag_end].ends_with('/') {
                        if depth == 0 {
                            break;
                        }
                    } else {
                        depth += 1;
                    }
                }
                (_, Some(close)) => {
                    at = close + CLOSE.len();
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        break;
                    }
                }
                (_, None) => bail!("unbalanced <backingStore> in the saved XML"),
            }
        }
        rest = &rest[at..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::metadata::ForwardState;
    use crate::domain::tests::sample_state;

    fn saved(source: &VmState) -> String {
        let meta = quick_xml::se::to_string_with_root("agentvm:vm", source).unwrap();
        format!(
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>agentvm-src</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <metadata>
    {meta}
  </metadata>
  <devices>
    <disk type='file' device='disk'><source file='/h/vms/src/disk.qcow2'/><target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></disk>
    <serial type='file'><source path='/h/vms/src/serial.log' append='on'/></serial>
    <console type='file'><source path='/h/vms/src/serial.log' append='on'/></console>
    <channel type='unix'><source mode='bind' path='/run/a/src.qga'/></channel>
    <graphics type='spice' port='5901' autoport='no' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=agentvm-net0,hostfwd=tcp:127.0.0.1:2223-:22,hostfwd=tcp:127.0.0.1:8080-:80'/>
  </qemu:commandline>
</domain>"
        )
    }

    fn states() -> (VmState, VmState) {
        let mut source = sample_state("src");
        source.ssh_port = 2223;
        source.spice_port = 5901;
        source.forwards = vec![ForwardState {
            host_addr: "127.0.0.1".parse().unwrap(),
            host_port: 8080,
            guest_port: 80,
            live: false,
        }];
        let mut fork = source.clone();
        fork.name = "copy".into();
        fork.ssh_port = 2230;
        fork.spice_port = 5910;
        fork.forwards.clear();
        fork.layers = vec!["/h/vms/src/disk.qcow2".into()];
        fork.forked_from = Some("src".into());
        (source, fork)
    }

    fn identity<'a>(source: &'a VmState, fork: &'a VmState) -> ForkIdentity<'a> {
        ForkIdentity {
            source,
            fork,
            disk: (
                "/h/vms/src/disk.qcow2".into(),
                "/h/vms/copy/disk.qcow2".into(),
            ),
            paths: vec![
                (
                    "/h/vms/src/serial.log".into(),
                    "/h/vms/copy/serial.log".into(),
                ),
                ("/run/a/src.qga".into(), "/run/a/copy.qga".into()),
            ],
        }
    }

    #[test]
    fn changes_identity_and_keeps_devices() {
        let (source, fork) = states();
        let xml = rewrite(&saved(&source), &identity(&source, &fork)).unwrap();
        assert!(xml.contains("<name>agentvm-copy</name>"), "{xml}");
        assert!(!xml.contains("<uuid>"), "{xml}");
        // Only the metadata's layer still names the source's folder.
        assert_eq!(xml.matches("/vms/src/").count(), 1, "{xml}");
        assert!(
            xml.contains("<source file='/h/vms/copy/disk.qcow2'/>"),
            "{xml}"
        );
        assert_eq!(xml.matches("/h/vms/copy/serial.log").count(), 2, "{xml}");
        assert!(xml.contains("path='/run/a/copy.qga'"), "{xml}");
        assert!(xml.contains("<graphics type='spice' port='5910'"), "{xml}");
        assert!(
            xml.contains("value='user,id=agentvm-net0,hostfwd=tcp:127.0.0.1:2230-:22'"),
            "the source's forward is dropped: {xml}"
        );
        assert!(
            xml.contains(
                "<address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>"
            ),
            "{xml}"
        );
        let meta_start = xml.find("<agentvm:vm").unwrap();
        let meta_end = xml.find("</agentvm:vm>").unwrap() + "</agentvm:vm>".len();
        let state: VmState = quick_xml::de::from_str(&xml[meta_start..meta_end]).unwrap();
        assert_eq!(state, fork);
    }

    #[test]
    fn uuid_goes_after_the_name() {
        let xml = with_uuid("<domain><name>agentvm-a</name><memory/></domain>", "u-1").unwrap();
        assert_eq!(
            xml,
            "<domain><name>agentvm-a</name>\n  <uuid>u-1</uuid><memory/></domain>"
        );
    }

    #[test]
    fn xml_without_the_layer_as_disk_is_refused() {
        let (source, fork) = states();
        let mut id = identity(&source, &fork);
        id.disk.0 = "/h/vms/src/disk-1.qcow2".into();
        let err = rewrite(&saved(&source), &id).unwrap_err();
        assert!(
            format!("{err:#}").contains("no disk on the frozen layer"),
            "{err:#}"
        );
    }

    #[test]
    fn xml_of_another_vm_is_refused() {
        let (source, fork) = states();
        let other = saved(&source).replace("agentvm-src", "agentvm-other");
        let err = rewrite(&other, &identity(&source, &fork)).unwrap_err();
        assert!(format!("{err:#}").contains("no domain name"), "{err:#}");
    }

    #[test]
    fn backing_stores_are_dropped_whole() {
        let xml = "<disk><source file='a'/>\
            <backingStore type='file' index='1'><format type='qcow2'/><source file='b'/>\
            <backingStore type='file' index='2'><source file='c'/><backingStore/></backingStore>\
            </backingStore><target dev='vda'/></disk><disk><backingStore/><target dev='vdb'/></disk>";
        assert_eq!(
            without_backing_stores(xml).unwrap(),
            "<disk><source file='a'/><target dev='vda'/></disk><disk><target dev='vdb'/></disk>"
        );
    }

    #[test]
    fn xml_without_backing_stores_is_unchanged() {
        let xml = "<domain><disk/></domain>";
        assert_eq!(without_backing_stores(xml).unwrap(), xml);
    }
}
