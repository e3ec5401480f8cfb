//! Storages of the fake PVE: their list, their content and uploads (pve-storage's
//! API2/Storage/Status.pm and Content.pm), and the multipart parser of pve-http-server.

use std::process::Command;

use regex::bytes::Regex;
use serde_json::{Value, json};
use sha2::Digest;

use super::model::FakeStorage;
use super::qemu::is_disk_key;
use super::state::{Caller, Fail, Params, State, Volume, fail, fail_param};
use super::syntax::parse_bool;
use super::tasks::unix_now;

impl State {
    /// The node key of a storage's volumes: shared ones are the same on every node.
    pub(super) fn volume_node(&self, storage: &FakeStorage) -> String {
        if storage.shared {
            String::new()
        } else {
            self.here.clone()
        }
    }

    /// A volume (`storage:import/x.qcow2`) as the node of the request sees it.
    pub(super) fn volume(&self, volid: &str) -> Option<&Volume> {
        let storage = self.storage(volid.split(':').next()?).ok()?;
        self.volumes
            .get(&(self.volume_node(storage), volid.to_string()))
    }

    /// `GET /nodes/{node}/storage`: the storages the caller may see (`Datastore.Audit` or
    /// `Datastore.AllocateSpace`), filtered by `content`, `storage`, `target`.
    pub(super) fn list_storages(&self, caller: &Caller, p: &Params) -> Result<Value, Fail> {
        if let Some(name) = p.get("storage")
            && self.storage(name).is_err()
        {
            return fail_param("storage", "No such storage.");
        }
        let wanted: Vec<&str> = p
            .get("content")
            .map(|c| c.split(',').filter(|c| !c.is_empty()).collect())
            .unwrap_or_default();
        let target = p.get("target").filter(|t| **t != self.here);
        let with_format = p.get("format").and_then(|f| parse_bool(f)) == Some(true);
        let mut list = Vec::new();
        for s in &self.storages {
            let visible = caller.has("Datastore.Audit") || caller.has("Datastore.AllocateSpace");
            if !visible
                || p.get("storage").is_some_and(|n| *n != s.name)
                || (!wanted.is_empty() && !wanted.iter().any(|c| s.allows(c)))
                || (target.is_some() && !s.shared)
            {
                continue;
            }
            let used = self.storage_used(&self.here, s);
            let total = used + s.avail;
            let mut r = json!({
                "storage": s.name, "type": s.kind, "content": s.content.join(","),
                "shared": u8::from(s.shared), "active": 1, "enabled": 1,
                "total": total, "used": used, "avail": s.avail,
                "used_fraction": used as f64 / total as f64,
            });
            if with_format {
                let (supported, default) = if s.has_path() {
                    (vec!["qcow2", "raw", "vmdk"], "raw")
                } else {
                    (vec!["raw"], "raw")
                };
                let valid: serde_json::Map<String, Value> = supported
                    .iter()
                    .map(|f| (f.to_string(), json!(1)))
                    .collect();
                r["formats"] = json!({ "supported": supported, "default": default });
                r["format"] = json!([valid, default]);
            }
            list.push(r);
        }
        Ok(Value::Array(list))
    }

    /// `GET /nodes/{node}/storage/{storage}/content`: uploaded files and VM disks.
    pub(super) fn storage_content(
        &self,
        caller: &Caller,
        storage: &str,
        p: &Params,
    ) -> Result<Value, Fail> {
        caller.require_any(
            &format!("/storage/{storage}"),
            &["Datastore.Audit", "Datastore.AllocateSpace"],
        )?;
        let s = self.storage(storage)?;
        let content = p.get("content").map(String::as_str);
        let node = self.volume_node(s);
        let prefix = format!("{storage}:");
        let mut list = Vec::new();
        for ((n, volid), volume) in &self.volumes {
            let Some(kind) = volid
                .strip_prefix(&prefix)
                .and_then(|v| v.split('/').next())
            else {
                continue;
            };
            if *n != node || content.is_some_and(|c| c != kind) {
                continue;
            }
            let format = match kind {
                "iso" => "iso".to_string(),
                _ => volid.rsplit('.').next().unwrap_or("raw").to_string(),
            };
            list.push(json!({
                "volid": volid, "format": format, "size": volume.data.len(),
                "ctime": volume.ctime, "content": kind,
            }));
        }
        if content.is_none_or(|c| c == "images") && s.allows("images") {
            for (vmid, vm) in &self.vms {
                if !s.shared && vm.node != self.here {
                    continue;
                }
                for (key, value) in &vm.config {
                    let volid = value.split(',').next().unwrap_or("");
                    if !is_disk_key(key)
                        || !volid.starts_with(&prefix)
                        || volid.ends_with("cloudinit")
                    {
                        continue;
                    }
                    let gib = super::qemu::drive_size_gib(value).unwrap_or(0.0);
                    list.push(json!({
                        "volid": volid, "format": "raw", "size": (gib * (1u64 << 30) as f64) as u64,
                        "vmid": vmid, "content": "images", "ctime": 1_700_000_000,
                    }));
                }
            }
        }
        Ok(Value::Array(list))
    }

    /// `DELETE /nodes/{node}/storage/{storage}/content/{volume}` (pve-storage's Content.pm
    /// delete): the volume as a volume ID or a name on `storage`, `Datastore.Allocate` on the
    /// storage, then a task (`imgdel`) that removes it, failing as vdisk_free does for a file
    /// that is not there. Returns the task's UPID (`delay` is not waited for).
    pub(super) fn delete_volume(
        &mut self,
        caller: &Caller,
        storage: &str,
        volume: &str,
    ) -> Result<Value, Fail> {
        let volid = match volume.split_once(':') {
            Some((sid, _)) if sid != storage => {
                return fail_param(
                    "volume",
                    format!("storage ID mismatch ({sid} != {storage})"),
                );
            }
            Some(_) => volume.to_string(),
            None => format!("{storage}:{volume}"),
        };
        let s = self.storage(storage)?.clone();
        caller.require(&format!("/storage/{storage}"), "Datastore.Allocate")?;
        let path = format!(
            "{}/{}",
            s.path(),
            volid.split_once(':').map_or("", |(_, name)| name)
        );
        let key = (self.volume_node(&s), volid.clone());
        let upid = self.start_task("imgdel", storage, &caller.token, move |st| {
            if st.volumes.remove(&key).is_none() {
                return Err(format!(
                    "unlink '{path}' failed - No such file or directory"
                ));
            }
            Ok(vec![format!("Removed volume '{volid}'")])
        });
        Ok(json!(upid))
    }

    /// `POST /nodes/{node}/storage/{storage}/upload` (multipart, parsed by the server into
    /// `p` and [`State::upload_data`]): checks synchronously, then a task (`imgcopy`) verifies
    /// the checksum and the image format and stores `{storage}:{content}/{filename}`.
    pub(super) fn upload(
        &mut self,
        caller: &Caller,
        storage: &str,
        p: &Params,
    ) -> Result<Value, Fail> {
        let data = self.upload_data.take().unwrap_or_default();
        caller.require(&format!("/storage/{storage}"), "Datastore.AllocateTemplate")?;
        let s = self.storage(storage)?.clone();
        let node = self.here.clone();
        match self.check_node(&node) {
            Err((595, _)) => {
                return fail(
                    500,
                    format!(
                        "can't activate storage '{storage}' on node '{node}': command '/usr/bin/ssh -e none -o BatchMode=yes -o HostKeyAlias={node} root@{node} -- /usr/sbin/pvesm status --storage {storage}' failed: exit code 255"
                    ),
                );
            }
            other => other?,
        }
        if !s.has_path() {
            return fail(500, format!("can't upload to storage type '{}'", s.kind));
        }
        let content = p["content"].clone();
        let filename = normalize_filename(&p["filename"]);
        let ext_ok = |re: &str| regex::Regex::new(re).unwrap().is_match(&filename);
        let mut image_format = None;
        match content.as_str() {
            "iso" if !ext_ok(r"(?i)[^/]+\.(?:iso|img)$") => {
                return fail_param("filename", "wrong file extension");
            }
            "vztmpl" if !ext_ok(r"(?i)[^/]+\.(tar|tar\.(gz|xz|zst|bz2))$") => {
                return fail_param("filename", "wrong file extension");
            }
            "import" => {
                let re = regex::Regex::new(r"[a-zA-Z0-9\-\.\+=_]+\.(ova|qcow2|raw|vmdk)$").unwrap();
                let Some(c) = re.captures(&filename) else {
                    return fail_param("filename", "invalid filename or wrong extension");
                };
                image_format = Some(c[1].to_string());
            }
            "iso" | "vztmpl" => {}
            other => {
                return fail_param(
                    "content",
                    format!("upload content type '{other}' not allowed"),
                );
            }
        }
        if !s.allows(&content) {
            return fail(
                500,
                format!("storage '{storage}' does not support '{content}' content"),
            );
        }
        let tmp = format!(
            "/var/tmp/pveupload-{:032x}",
            self.next_counter() * 0x9e37_79b9
        );
        let dest = format!("{}/{content}/{filename}", s.path());
        let volid = format!("{storage}:{content}/{filename}");
        let key = (self.volume_node(&s), volid);
        let checksum = p.get("checksum").cloned();
        let algorithm = p.get("checksum-algorithm").cloned();
        let upid = self.start_task("imgcopy", "", &caller.token, move |st| {
            let mut log = vec![format!("starting file import from: {tmp}")];
            if let (Some(algorithm), Some(expected)) = (algorithm, checksum) {
                let got = file_hash(&algorithm, &data)?;
                if got.to_lowercase() != expected.to_lowercase() {
                    return Err(format!(
                        "checksum mismatch: got '{got}' != expect '{expected}'"
                    ));
                }
                log.push("calculating checksum...OK, checksum verified".to_string());
            }
            if let Some(format) = image_format {
                image_size(&format, &data)
                    .ok_or("failed to query file information with qemu-img")?;
            }
            log.push(format!("target node: {node}"));
            log.push(format!("target file: {dest}"));
            log.push(format!("file size is: {}", data.len()));
            log.push(format!("command: cp -- {tmp} {dest}"));
            log.push("finished file import successfully".to_string());
            st.volumes.insert(
                key,
                Volume {
                    data,
                    ctime: unix_now(),
                },
            );
            Ok(log)
        });
        Ok(json!(upid))
    }
}

/// pve-storage's normalize_content_filename.
pub(super) fn normalize_filename(name: &str) -> String {
    let name = name.trim_end_matches('\n');
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    base.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The virtual size `qemu-img info -f FORMAT` reports, or `None` when the data is not of that
/// format: a qcow2 header's size, a VMDK's capacity; raw (and OVA) data is its own size.
pub(super) fn image_size(format: &str, data: &[u8]) -> Option<u64> {
    let be64 = |at: usize| Some(u64::from_be_bytes(data.get(at..at + 8)?.try_into().ok()?));
    let le64 = |at: usize| Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?));
    match format {
        "qcow2" if data.starts_with(b"QFI\xfb") => be64(24),
        "vmdk" if data.starts_with(b"KDMV") => le64(12).map(|sectors| sectors * 512),
        "qcow2" | "vmdk" => None,
        _ => Some(data.len() as u64),
    }
}

/// PVE::Tools::get_file_hash: the hex digest of `data`.
fn file_hash(algorithm: &str, data: &[u8]) -> Result<String, String> {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    Ok(match algorithm {
        "sha224" => hex(&sha2::Sha224::digest(data)),
        "sha256" => hex(&sha2::Sha256::digest(data)),
        "sha384" => hex(&sha2::Sha384::digest(data)),
        "sha512" => hex(&sha2::Sha512::digest(data)),
        "md5" | "sha1" => {
            // Not among this crate's dependencies: coreutils computes them.
            let tmp = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
            std::fs::write(tmp.path(), data).map_err(|e| e.to_string())?;
            let out = Command::new(format!("{algorithm}sum"))
                .arg(tmp.path())
                .output()
                .map_err(|e| format!("{algorithm}sum: {e}"))?;
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        }
        other => return Err(format!("unknown checksum algorithm '{other}'")),
    })
}

/// What pve-http-server's file_upload_multipart takes from a `multipart/form-data` body: the
/// `content`, `checksum-algorithm` and `checksum` fields, in that order and before the file
/// part, then the file part named `filename` (its `filename=` becomes the `filename`
/// parameter), whose data runs to the closing boundary. Returns the fields and the file data.
pub(super) fn parse_multipart(body: &[u8], boundary: &str) -> Result<(Params, Vec<u8>), String> {
    let b = regex::escape(boundary);
    let delim = format!(r"--{b}\r?\n");
    let re = |pattern: &str| Regex::new(&format!("(?s-u){pattern}")).unwrap();
    let mut buf: &[u8] = body;
    let mut params = Params::new();
    // pve-http-server matches the fields within what it has read so far; a window will do.
    let window = |buf: &[u8]| buf.len().min(64 << 10);
    // Phase 0: skip everything before the first boundary.
    let Some(m) = re(&delim).find(&buf[..window(buf)]) else {
        return Err("upload failed".into());
    };
    buf = &buf[m.start()..];
    let until_data = re(r"^.*?(?:\r?\n){2}");
    for name in ["content", "checksum-algorithm", "checksum"] {
        let field = re(&format!(
            r#"^{delim}.*?Content-Disposition: (.*?); name="{}"(.*?{delim})"#,
            regex::escape(name)
        ));
        let Some(c) = field.captures(&buf[..window(buf)]) else {
            continue;
        };
        check_disposition(&c[1])?;
        buf = &buf[c.get(2).unwrap().start()..];
        if let Some(m) = until_data.find(&buf[..window(buf)]) {
            buf = &buf[m.end()..];
        }
        let value = re(&format!("^(.*?)({delim})"))
            .captures(&buf[..window(buf)])
            .map(|c| {
                let v = String::from_utf8_lossy(&c[1]).trim().to_string();
                (v, c.get(2).unwrap().start())
            });
        if let Some((v, at)) = value {
            params.insert(name.to_string(), v);
            buf = &buf[at..];
        }
    }
    let file = re(&format!(
        r#"^{delim}Content-Disposition: (.*?); name="(.*?)"; filename="([^"]+)""#
    ));
    let Some(c) = file.captures(&buf[..window(buf)]) else {
        return Err("upload failed".into());
    };
    check_disposition(&c[1])?;
    if &c[2] != b"filename" {
        return Err(format!(
            "wrong field name '{}' for file upload, expected 'filename'",
            String::from_utf8_lossy(&c[2])
        ));
    }
    params.insert(
        "filename".into(),
        String::from_utf8_lossy(&c[3]).trim().to_string(),
    );
    buf = &buf[c.get(0).unwrap().end()..];
    if let Some(m) = until_data.find(&buf[..window(buf)]) {
        buf = &buf[m.end()..];
    }
    // The data runs to the closing boundary, less the line break before it.
    let Some(m) = re(&format!("--{b}--")).find(buf) else {
        return Err("upload failed".into());
    };
    let mut data = &buf[..m.start()];
    if let Some(d) = data.strip_suffix(b"\n") {
        data = d.strip_suffix(b"\r").unwrap_or(d);
    }
    Ok((params, data.to_vec()))
}

fn check_disposition(disposition: &[u8]) -> Result<(), String> {
    if disposition == b"form-data" {
        Ok(())
    } else {
        Err(format!(
            "wrong Content-Disposition '{}' in multipart, expected 'form-data'",
            String::from_utf8_lossy(disposition)
        ))
    }
}
