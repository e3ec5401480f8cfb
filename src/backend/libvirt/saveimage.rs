//! libvirt's QEMU save image (what `virDomainSave` and an external memory
//! snapshot write): a fixed header, the domain XML, a cookie, zero padding,
//! then QEMU's migration stream. `fork` restores one memory snapshot as many
//! VMs by rewriting its XML to name each before restoring it, since libvirt
//! refuses a restore XML whose UUID differs from the saved one.
//!
//! The layout (libvirt's `src/qemu/qemu_saveimage.h`, `virQEMUSaveHeader`,
//! host byte order):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..16 | magic `LibvirtQemudSave` (`LibvirtQemudPart` while being written) |
//! | 16..20 | version (2) |
//! | 20..24 | `data_len`: bytes of XML, cookie and padding after the header |
//! | 24..28 | was_running |
//! | 28..32 | compression format (0: raw) |
//! | 32..36 | `cookieOffset`: where the cookie starts in the data (version 2) |
//! | 36..92 | unused |
//!
//! The data holds the XML and the cookie, each NUL-terminated, then zeros up
//! to `data_len` (libvirt leaves 64 KiB of room); the migration stream
//! starts right after it, so a new XML that fits leaves the stream in place.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

/// The magic of a complete save image.
pub const MAGIC: &[u8; 16] = b"LibvirtQemudSave";
/// The magic of a save image libvirt has not finished writing.
pub const PARTIAL_MAGIC: &[u8; 16] = b"LibvirtQemudPart";
/// The header's size: magic, five `u32` fields and 14 unused `u32`s.
pub const HEADER_LEN: usize = 16 + 5 * 4 + 14 * 4;
/// The newest header version this code reads.
pub const MAX_VERSION: u32 = 2;
/// Where `data_len` and `cookieOffset` are in the header.
const DATA_LEN_AT: usize = 20;
const COOKIE_OFFSET_AT: usize = 32;
/// A data region larger than this is not a save image libvirt wrote.
const MAX_DATA_LEN: u32 = 64 << 20;

/// The header and data of a save image (not its migration stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveImage {
    header: [u8; HEADER_LEN],
    data_len: u32,
    xml: String,
    cookie: Option<String>,
}

impl SaveImage {
    /// Reads the header and the data of the save image at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut header = [0u8; HEADER_LEN];
        file.read_exact(&mut header)
            .with_context(|| format!("reading the header of {}", path.display()))?;
        let data_len = Self::check_header(&header)
            .with_context(|| format!("{} is not a usable save image", path.display()))?;
        let mut data = vec![0u8; data_len as usize];
        file.read_exact(&mut data)
            .with_context(|| format!("reading the domain XML of {}", path.display()))?;
        Self::parse(header, &data).with_context(|| format!("reading {}", path.display()))
    }

    /// The header's `data_len`, once magic and version are known to be usable.
    fn check_header(header: &[u8; HEADER_LEN]) -> Result<u32> {
        if &header[..16] == PARTIAL_MAGIC {
            bail!("libvirt did not finish writing it");
        }
        if &header[..16] != MAGIC {
            bail!("no libvirt save image magic");
        }
        let version = u32_at(header, 16);
        if version == 0 || version > MAX_VERSION {
            bail!("save image version {version} (this build reads 1 to {MAX_VERSION})");
        }
        let data_len = u32_at(header, DATA_LEN_AT);
        if data_len > MAX_DATA_LEN {
            bail!("data length {data_len} is implausible");
        }
        Ok(data_len)
    }

    fn parse(header: [u8; HEADER_LEN], data: &[u8]) -> Result<Self> {
        let data_len = Self::check_header(&header)?;
        let cookie_offset = match u32_at(&header, 16) {
            1 => 0,
            _ => u32_at(&header, COOKIE_OFFSET_AT) as usize,
        };
        if cookie_offset > data.len() {
            bail!("the cookie offset {cookie_offset} is past the data");
        }
        let xml_bytes = if cookie_offset > 0 {
            &data[..cookie_offset]
        } else {
            data
        };
        let xml = nul_terminated(xml_bytes).context("the domain XML")?;
        let cookie = if cookie_offset > 0 {
            Some(nul_terminated(&data[cookie_offset..]).context("the cookie")?)
        } else {
            None
        };
        Ok(Self {
            header,
            data_len,
            xml,
            cookie,
        })
    }

    /// The domain XML the image restores.
    pub fn xml(&self) -> &str {
        &self.xml
    }

    /// Header and data with `xml` in place of the saved XML, the same length
    /// as before (so the migration stream after it stays where it is).
    pub fn with_xml(&self, xml: &str) -> Result<Vec<u8>> {
        if xml.as_bytes().contains(&0) {
            bail!("a domain XML cannot hold a NUL byte");
        }
        let cookie_len = self.cookie.as_ref().map_or(0, |c| c.len() + 1);
        let used = xml.len() + 1 + cookie_len;
        if used > self.data_len as usize {
            bail!(
                "the new domain XML ({} bytes) does not fit in the save image's {} bytes",
                xml.len(),
                self.data_len
            );
        }
        let mut out = Vec::with_capacity(HEADER_LEN + self.data_len as usize);
        out.extend_from_slice(&self.header);
        if self.cookie.is_some() {
            let offset = u32::try_from(xml.len() + 1).context("XML too long")?;
            out[COOKIE_OFFSET_AT..COOKIE_OFFSET_AT + 4].copy_from_slice(&offset.to_ne_bytes());
        }
        out.extend_from_slice(xml.as_bytes());
        out.push(0);
        if let Some(cookie) = &self.cookie {
            out.extend_from_slice(cookie.as_bytes());
            out.push(0);
        }
        out.resize(HEADER_LEN + self.data_len as usize, 0);
        Ok(out)
    }

    /// Rewrites the save image at `path` in place with `xml` as its domain
    /// XML (the header and data only; the migration stream is not touched).
    pub fn write_xml(&self, path: &Path, xml: &str) -> Result<()> {
        let head = self.with_xml(xml)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.seek(SeekFrom::Start(0))?;
        // No fsync: the file lives only until the restore has read it, and
        // syncing would write the whole memory snapshot out to disk first.
        file.write_all(&head)
            .with_context(|| format!("writing the domain XML into {}", path.display()))?;
        Ok(())
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_ne_bytes(word)
}

/// The UTF-8 text before the first NUL of `bytes` (which must have one).
fn nul_terminated(bytes: &[u8]) -> Result<String> {
    let end = bytes
        .iter()
        .position(|&b| b == 0)
        .context("no terminating NUL")?;
    Ok(std::str::from_utf8(&bytes[..end])
        .context("not UTF-8")?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A save image as libvirt writes it: header, XML, cookie, padding, stream.
    fn synthetic(xml: &str, cookie: Option<&str>, pad: usize, stream: &[u8]) -> Vec<u8> {
        let mut data = xml.as_bytes().to_vec();
        data.push(0);
        let cookie_offset = if let Some(cookie) = cookie {
            let at = data.len() as u32;
            data.extend_from_slice(cookie.as_bytes());
            data.push(0);
            at
        } else {
            0
        };
        data.resize(data.len() + pad, 0);
        let mut file = MAGIC.to_vec();
        for word in [2u32, data.len() as u32, 1, 0, cookie_offset] {
            file.extend_from_slice(&word.to_ne_bytes());
        }
        file.resize(HEADER_LEN, 0);
        file.extend_from_slice(&data);
        file.extend_from_slice(stream);
        file
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn header_is_libvirts_92_bytes() {
        assert_eq!(HEADER_LEN, 92);
    }

    #[test]
    fn reads_xml_and_cookie() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "a.save",
            &synthetic("<domain>a</domain>", Some("<cookie/>"), 100, b"QEVM"),
        );
        let image = SaveImage::read(&path).unwrap();
        assert_eq!(image.xml(), "<domain>a</domain>");
        assert_eq!(image.cookie.as_deref(), Some("<cookie/>"));
    }

    #[test]
    fn new_xml_keeps_stream_and_cookie() {
        let dir = tempfile::tempdir().unwrap();
        let stream = b"QEVM\x00\x00\x00\x03migration-stream-bytes";
        let original = synthetic(
            "<domain>old</domain>",
            Some("<cookie>c</cookie>"),
            64,
            stream,
        );
        let to = write(dir.path(), "a.save", &original);
        let image = SaveImage::read(&to).unwrap();
        let new_xml = "<domain><name>a much longer new name</name></domain>";
        image.write_xml(&to, new_xml).unwrap();

        let copy = std::fs::read(&to).unwrap();
        assert_eq!(copy.len(), original.len(), "the stream did not move");
        assert!(copy.ends_with(stream));
        let again = SaveImage::read(&to).unwrap();
        assert_eq!(again.xml(), new_xml);
        assert_eq!(again.cookie.as_deref(), Some("<cookie>c</cookie>"));
        assert_eq!(
            u32_at(&copy, COOKIE_OFFSET_AT) as usize,
            new_xml.len() + 1,
            "the cookie offset follows the new XML"
        );
        // The rest of the header (version, data_len, was_running) is kept.
        assert_eq!(copy[..32], original[..32]);
    }

    #[test]
    fn xml_too_long_for_the_padding_is_refused() {
        let image = SaveImage::parse(
            synthetic("<d/>", Some("<c/>"), 4, b"")[..HEADER_LEN]
                .try_into()
                .unwrap(),
            &synthetic("<d/>", Some("<c/>"), 4, b"")[HEADER_LEN..],
        )
        .unwrap();
        let err = image.with_xml(&"x".repeat(100)).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    #[test]
    fn partial_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut partial = synthetic("<d/>", None, 8, b"");
        partial[..16].copy_from_slice(PARTIAL_MAGIC);
        let path = write(dir.path(), "p.save", &partial);
        let err = format!("{:#}", SaveImage::read(&path).unwrap_err());
        assert!(err.contains("did not finish"), "{err}");

        let path = write(dir.path(), "f.save", &[b'x'; HEADER_LEN + 8]);
        let err = format!("{:#}", SaveImage::read(&path).unwrap_err());
        assert!(err.contains("no libvirt save image magic"), "{err}");
    }

    #[test]
    fn version_1_has_no_cookie() {
        let mut bytes = synthetic("<d/>", None, 8, b"");
        bytes[16..20].copy_from_slice(&1u32.to_ne_bytes());
        let image = SaveImage::parse(
            bytes[..HEADER_LEN].try_into().unwrap(),
            &bytes[HEADER_LEN..],
        )
        .unwrap();
        assert_eq!(image.xml(), "<d/>");
        assert_eq!(image.cookie, None);
    }
}
