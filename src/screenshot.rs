//! QEMU's `screendump` writes PPM; agentvm hands out PNG.

use std::io::BufWriter;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// A binary PPM (`P6`, 8-bit) as width, height and RGB bytes.
pub fn parse_ppm(data: &[u8]) -> Result<(u32, u32, &[u8])> {
    // Header: magic, width, height, maxval, each separated by whitespace
    // (comments start with '#'), then one whitespace byte, then pixels.
    let mut fields = Vec::new();
    let mut pos = 0;
    while fields.len() < 4 {
        while pos < data.len() && (data[pos].is_ascii_whitespace() || data[pos] == b'#') {
            if data[pos] == b'#' {
                while pos < data.len() && data[pos] != b'\n' {
                    pos += 1;
                }
            } else {
                pos += 1;
            }
        }
        let start = pos;
        while pos < data.len() && !data[pos].is_ascii_whitespace() {
            pos += 1;
        }
        if start == pos {
            bail!("truncated PPM header");
        }
        fields.push(std::str::from_utf8(&data[start..pos]).context("PPM header")?);
    }
    if fields[0] != "P6" {
        bail!("not a binary PPM (magic {:?})", fields[0]);
    }
    let width: u32 = fields[1].parse().context("PPM width")?;
    let height: u32 = fields[2].parse().context("PPM height")?;
    if fields[3] != "255" {
        bail!("unsupported PPM maxval {}", fields[3]);
    }
    let pixels = &data[(pos + 1).min(data.len())..];
    let want = width as usize * height as usize * 3;
    if pixels.len() < want {
        bail!("PPM has {} bytes of pixels, {want} expected", pixels.len());
    }
    Ok((width, height, &pixels[..want]))
}

/// Writes a PPM image as a PNG file; returns its width and height.
pub fn ppm_to_png(ppm: &[u8], png_path: &Path) -> Result<(u32, u32)> {
    let (width, height, rgb) = parse_ppm(ppm)?;
    let file = std::fs::File::create(png_path)
        .with_context(|| format!("creating {}", png_path.display()))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().context("writing PNG header")?;
    writer.write_image_data(rgb).context("writing PNG data")?;
    writer.finish().context("finishing PNG")?;
    Ok((width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_ppm_to_a_png_with_the_same_pixels() {
        let mut ppm = b"P6\n# made by a test\n2 1\n255\n".to_vec();
        ppm.extend_from_slice(&[255, 0, 0, 0, 0, 255]);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("s.png");
        assert_eq!(ppm_to_png(&ppm, &out).unwrap(), (2, 1));
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (2, 1));
        assert_eq!(&buf[..6], &[255, 0, 0, 0, 0, 255]);
    }

    #[test]
    fn rejects_broken_ppm() {
        assert!(parse_ppm(b"P5\n1 1\n255\n\0").is_err());
        assert!(parse_ppm(b"P6\n4 4\n255\n\0\0\0").is_err());
        assert!(parse_ppm(b"P6\n").is_err());
    }
}
