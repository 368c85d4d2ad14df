//! Frame preprocessing: an interleaved RGB8 frame of any size into the model's
//! ImageNet-normalized `[3, H, W]` input, written into a caller buffer without allocating.
//!
//! # Resize policy
//!
//! The whole frame is resized to the model's `H x W` (no crop, so the aspect ratio is
//! not kept when it differs; tokens then map to equal-sized cells of the frame) by
//! bilinear interpolation with half-pixel centres and edge clamping, the convention of
//! PyTorch `F.interpolate(mode="bilinear", align_corners=False, antialias=False)` and
//! OpenCV `INTER_LINEAR`: output pixel `x` samples source coordinate
//! `(x + 0.5) * src_w / W - 0.5`.
//! A frame already `H x W` is copied exactly.
//! Bilinear sampling takes no anti-aliasing filter, so a downscale by more than 2x aliases;
//! scale such frames down first (the capture pipeline usually can).
//!
//! Each channel value `v` (0..=255) becomes `(v / 255 - mean[c]) / std[c]`.

use crate::error::ModelError;

/// Per-channel normalization applied to values scaled to `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    /// Channel means (R, G, B), in `[0, 1]` units.
    pub mean: [f32; 3],
    /// Channel standard deviations (R, G, B), in `[0, 1]` units.
    pub std: [f32; 3],
}

impl Normalization {
    /// The ImageNet statistics every FLSL backbone is trained with.
    pub const IMAGENET: Self =
        Self::new(crate::contract::IMAGENET_MEAN, crate::contract::IMAGENET_STD);

    /// A normalization from its parts.
    pub const fn new(mean: [f32; 3], std: [f32; 3]) -> Self {
        Self { mean, std }
    }
}

impl Default for Normalization {
    /// [`Normalization::IMAGENET`].
    fn default() -> Self {
        Self::IMAGENET
    }
}

/// A borrowed interleaved RGB8 frame (`R, G, B` bytes per pixel, rows top to bottom).
#[derive(Debug, Clone, Copy)]
pub struct Rgb8Frame<'a> {
    data: &'a [u8],
    width: usize,
    height: usize,
    stride: usize,
}

impl<'a> Rgb8Frame<'a> {
    /// A tightly packed frame: `data.len() == 3 * width * height`.
    pub fn new(data: &'a [u8], width: usize, height: usize) -> Result<Self, ModelError> {
        Self::with_stride(data, width, height, 3 * width)
    }

    /// A frame whose rows start every `stride` bytes (`stride >= 3 * width`); the buffer
    /// must hold `stride * (height - 1) + 3 * width` bytes.
    pub fn with_stride(
        data: &'a [u8],
        width: usize,
        height: usize,
        stride: usize,
    ) -> Result<Self, ModelError> {
        if width == 0 || height == 0 {
            return Err(ModelError::Mismatch {
                what: "RGB8 frame size",
                expected: "non-zero width and height".into(),
                got: format!("{width}x{height}"),
            });
        }
        if stride < 3 * width {
            return Err(ModelError::Mismatch {
                what: "RGB8 frame stride",
                expected: format!(">= {}", 3 * width),
                got: stride.to_string(),
            });
        }
        let needed = stride * (height - 1) + 3 * width;
        if data.len() < needed {
            return Err(ModelError::Mismatch {
                what: "RGB8 frame buffer length",
                expected: format!(">= {needed} bytes for {width}x{height} with stride {stride}"),
                got: data.len().to_string(),
            });
        }
        Ok(Self { data, width, height, stride })
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }
}

/// Source sampling position for one output coordinate: `(i0, i1, weight of i1)`.
#[inline]
fn tap(dst: usize, scale: f32, src_len: usize) -> (usize, usize, f32) {
    let s = ((dst as f32 + 0.5) * scale - 0.5).max(0.0);
    let i0 = (s as usize).min(src_len - 1);
    let i1 = (i0 + 1).min(src_len - 1);
    (i0, i1, s - i0 as f32)
}

/// Resizes and normalizes `frame` into `out`, laid out `[3, out_h, out_w]` (planar CHW).
///
/// Never allocates; see the module docs for the resize policy.
/// `out.len()` must be `3 * out_h * out_w`.
pub fn preprocess_rgb8(
    frame: &Rgb8Frame<'_>,
    norm: &Normalization,
    out: &mut [f32],
    out_h: usize,
    out_w: usize,
) -> Result<(), ModelError> {
    let plane = out_h * out_w;
    if out.len() != 3 * plane || plane == 0 {
        return Err(ModelError::Mismatch {
            what: "preprocessing output buffer length",
            expected: format!("3 * {out_h} * {out_w} > 0"),
            got: out.len().to_string(),
        });
    }
    // v * a[c] + b[c] == (v / 255 - mean) / std
    let a: [f32; 3] = core::array::from_fn(|c| 1.0 / (255.0 * norm.std[c]));
    let b: [f32; 3] = core::array::from_fn(|c| -norm.mean[c] / norm.std[c]);
    let (r_out, rest) = out.split_at_mut(plane);
    let (g_out, b_out) = rest.split_at_mut(plane);
    let data = frame.data;

    if frame.width == out_w && frame.height == out_h {
        for y in 0..out_h {
            let row = &data[y * frame.stride..y * frame.stride + 3 * out_w];
            let o = y * out_w;
            for (x, px) in row.chunks_exact(3).enumerate() {
                r_out[o + x] = f32::from(px[0]) * a[0] + b[0];
                g_out[o + x] = f32::from(px[1]) * a[1] + b[1];
                b_out[o + x] = f32::from(px[2]) * a[2] + b[2];
            }
        }
        return Ok(());
    }

    let sy = frame.height as f32 / out_h as f32;
    let sx = frame.width as f32 / out_w as f32;
    for y in 0..out_h {
        let (y0, y1, fy) = tap(y, sy, frame.height);
        let row0 = &data[y0 * frame.stride..];
        let row1 = &data[y1 * frame.stride..];
        let o = y * out_w;
        for x in 0..out_w {
            let (x0, x1, fx) = tap(x, sx, frame.width);
            let (p00, p01) = (&row0[3 * x0..3 * x0 + 3], &row0[3 * x1..3 * x1 + 3]);
            let (p10, p11) = (&row1[3 * x0..3 * x0 + 3], &row1[3 * x1..3 * x1 + 3]);
            let v = |c: usize| {
                let top = f32::from(p00[c]) + (f32::from(p01[c]) - f32::from(p00[c])) * fx;
                let bot = f32::from(p10[c]) + (f32::from(p11[c]) - f32::from(p10[c])) * fx;
                top + (bot - top) * fy
            };
            r_out[o + x] = v(0) * a[0] + b[0];
            g_out[o + x] = v(1) * a[1] + b[1];
            b_out[o + x] = v(2) * a[2] + b[2];
        }
    }
    Ok(())
}

/// The largest image side any of our readers decodes (frames, calibration and training images).
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// The most a decoder may allocate for one image (the decoded pixels included).
pub const MAX_IMAGE_ALLOC: u64 = 512 << 20;
/// Decoded bytes per byte of the file a decoder may allocate (plus [`IMAGE_ALLOC_EXTRA`]):
/// above what real images reach. Deflate (PNG) expands at most 1032:1; a baseline JPEG's
/// cheapest block (DC only, 1-bit codes) is about 2 bits per 8x8 block and component, at most
/// ~512:1 with 4:2:0 chroma. So a small file cannot declare a huge image and make us allocate
/// for it.
pub const IMAGE_ALLOC_PER_BYTE: u64 = 1100;
/// See [`IMAGE_ALLOC_PER_BYTE`].
pub const IMAGE_ALLOC_EXTRA: u64 = 1 << 20;

/// The decoder limits for a file of `len` bytes: sides checked from the header before any
/// pixel is decoded, and the decoder's allocations capped at
/// `min(IMAGE_ALLOC_PER_BYTE * len + IMAGE_ALLOC_EXTRA, MAX_IMAGE_ALLOC)`.
pub fn image_limits(len: u64) -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(MAX_IMAGE_SIDE);
    l.max_image_height = Some(MAX_IMAGE_SIDE);
    l.max_alloc = Some(
        len.saturating_mul(IMAGE_ALLOC_PER_BYTE)
            .saturating_add(IMAGE_ALLOC_EXTRA)
            .min(MAX_IMAGE_ALLOC),
    );
    l
}

/// Decodes an image file (PNG or JPEG, format from its content) within [`image_limits`].
pub fn decode_image_file(path: &std::path::Path) -> image::ImageResult<image::DynamicImage> {
    let len = std::fs::metadata(path)?.len();
    let mut r = image::ImageReader::open(path)?.with_guessed_format()?;
    r.limits(image_limits(len));
    r.decode()
}

/// Decodes image bytes (PNG or JPEG, format from the content) within [`image_limits`].
pub fn decode_image_bytes(bytes: &[u8]) -> image::ImageResult<image::DynamicImage> {
    let mut r = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    r.limits(image_limits(bytes.len() as u64));
    r.decode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_an_exact_normalized_copy() {
        let data: Vec<u8> = (0..2 * 3 * 3).map(|i| (i * 13) as u8).collect();
        let f = Rgb8Frame::new(&data, 3, 2).unwrap();
        let mut out = vec![0.0; 18];
        preprocess_rgb8(&f, &Normalization::IMAGENET, &mut out, 2, 3).unwrap();
        // pixel (y=1, x=2), green channel
        let v = f32::from(data[(3 + 2) * 3 + 1]);
        let want = (v / 255.0 - 0.456) / 0.224;
        assert!((out[6 + 3 + 2] - want).abs() < 1e-5);
    }

    #[test]
    fn constant_frame_stays_constant_at_any_size() {
        let data = vec![128u8; 7 * 5 * 3];
        let f = Rgb8Frame::new(&data, 7, 5).unwrap();
        let mut out = vec![0.0; 3 * 4 * 9];
        preprocess_rgb8(&f, &Normalization::new([0.0; 3], [1.0; 3]), &mut out, 4, 9).unwrap();
        assert!(out.iter().all(|v| (v - 128.0 / 255.0).abs() < 1e-6));
    }

    #[test]
    fn half_pixel_bilinear_downscale_by_two_averages_pairs() {
        // 4x1 -> 2x1: output x samples source 0.5 and 2.5.
        let data = [0u8, 0, 0, 100, 100, 100, 200, 200, 200, 250, 250, 250];
        let f = Rgb8Frame::new(&data, 4, 1).unwrap();
        let mut out = vec![0.0; 6];
        preprocess_rgb8(&f, &Normalization::new([0.0; 3], [1.0 / 255.0; 3]), &mut out, 1, 2)
            .unwrap();
        assert!((out[0] - 50.0).abs() < 1e-3 && (out[1] - 225.0).abs() < 1e-3, "{out:?}");
    }

    #[test]
    fn bad_buffers_are_errors() {
        assert!(Rgb8Frame::new(&[0; 5], 1, 2).is_err());
        assert!(Rgb8Frame::with_stride(&[0; 12], 2, 2, 5).is_err());
        assert!(Rgb8Frame::new(&[], 0, 0).is_err());
        let f = Rgb8Frame::new(&[0; 3], 1, 1).unwrap();
        assert!(preprocess_rgb8(&f, &Normalization::IMAGENET, &mut [0.0; 5], 1, 2).is_err());
    }
}
