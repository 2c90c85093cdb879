//! Image decode and preparation: JPEG or PNG (8-bit gray, RGB, RGBA; CMYK JPEGs are converted
//! by the decoder), shorter side resized with a Catmull-Rom filter, centre crop, planar `u8`.

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;

/// Decodes `bytes` and returns a planar `u8 [3, size, size]` image: the shorter side is
/// resized to `size`, then the centre is cropped. `what` names the input in errors.
pub fn prepare_image(bytes: &[u8], size: usize, what: &str) -> Result<Vec<u8>> {
    if size == 0 {
        bail!("image size must be positive");
    }
    let fmt = image::guess_format(bytes)
        .with_context(|| format!("{what}: not a recognised image (JPEG or PNG expected)"))?;
    if !matches!(fmt, image::ImageFormat::Jpeg | image::ImageFormat::Png) {
        bail!("{what}: image format {fmt:?} is not supported (JPEG or PNG expected)");
    }
    let img = image::load_from_memory_with_format(bytes, fmt)
        .with_context(|| format!("{what}: cannot decode image"))?;
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if w == 0 || h == 0 {
        bail!("{what}: image has zero size");
    }
    let resized = if w.min(h) == size {
        rgb
    } else {
        // Round so the shorter side is exactly `size`, the longer at least `size`.
        let (nw, nh) = if w <= h {
            (
                size,
                ((h * size) as f64 / w as f64).round().max(size as f64) as usize,
            )
        } else {
            (
                ((w * size) as f64 / h as f64).round().max(size as f64) as usize,
                size,
            )
        };
        image::imageops::resize(&rgb, nw as u32, nh as u32, FilterType::CatmullRom)
    };
    let (w, h) = (resized.width() as usize, resized.height() as usize);
    let (x0, y0) = ((w - size) / 2, (h - size) / 2);
    let raw = resized.as_raw();
    let mut out = vec![0u8; 3 * size * size];
    let plane = size * size;
    for y in 0..size {
        let row = &raw[((y0 + y) * w + x0) * 3..((y0 + y) * w + x0 + size) * 3];
        for (x, px) in row.chunks_exact(3).enumerate() {
            out[y * size + x] = px[0];
            out[plane + y * size + x] = px[1];
            out[2 * plane + y * size + x] = px[2];
        }
    }
    Ok(out)
}
