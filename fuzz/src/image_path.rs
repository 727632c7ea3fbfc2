//! The image path of a crop, as the pipeline prepares one: an encoded
//! image decoded within limits, a raw buffer converted, or a bbox clipped
//! to the decoded frame; then resized into a small model input and
//! normalised.
//!
//! An input is a [`HEADER`]-byte header then the payload (encoded image,
//! raw pixels or frame):
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | source: 0 encoded image, 1 raw buffer, 2 bbox of a frame (mod 3) |
//! | 1 | resize mode (mod 3: stretch, letterbox, resize then centre crop), filter (/ 3 mod 3) |
//! | 2, 3 | model input width, height (1 + value mod [`MAX_INPUT`]) |
//! | 4 | letterbox pad, or the centre crop's ratio (1 + value / 85) |
//! | 5..7, 7..9 | raw width, height (u16 LE); also the frame size [`clip_bbox`] is tried on |
//! | 9 | raw format (mod 4: rgb8, bgr8, rgba8, gray8) |
//! | 10 | numbers in the bbox (4, or 3 / 5 when value mod 8 is 6 / 7) |
//! | 11..16 | unused |
//! | 16..36 | bbox as 5 f32 LE |

use image::{ImageBuffer, Rgb, RgbImage};
use retail_agent::manifest::{ColorOrder, Preprocess, ResizeFilter, ResizeMode};
use retail_agent::vision::decode::{clip_bbox, decode_image, raw_image, CropRect, DecodeLimits};
use retail_agent::vision::preprocess::InputGeometry;
use retail_agent::vision::{Preprocessor, RawFormat, VisionError};

pub const HEADER: usize = 36;
/// Largest model input side: small, so an execution stays fast.
pub const MAX_INPUT: u8 = 48;

/// Small limits, so a decompression bomb is cheap to refuse and a valid
/// image cheap to decode.
pub const LIMITS: DecodeLimits = DecodeLimits {
    max_bytes: 1 << 20,
    max_dimension: 1024,
    max_pixels: 1 << 18,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Encoded = 0,
    Raw = 1,
    Bbox = 2,
}

/// The header of one input, in the fields it encodes.
#[derive(Debug, Clone)]
pub struct Header {
    pub source: Source,
    /// 0 stretch, 1 letterbox, 2 resize then centre crop.
    pub mode: u8,
    /// 0 bilinear, 1 bicubic, 2 nearest.
    pub filter: u8,
    pub input_width: u8,
    pub input_height: u8,
    pub mode_param: u8,
    pub raw_width: u16,
    pub raw_height: u16,
    /// 0 rgb8, 1 bgr8, 2 rgba8, 3 gray8.
    pub raw_format: u8,
    pub bbox: Vec<f32>,
}

impl Header {
    /// The header's bytes, followed by `payload`.
    pub fn frame(&self, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; HEADER];
        h[0] = self.source as u8;
        h[1] = self.mode + 3 * self.filter;
        h[2] = self.input_width.saturating_sub(1);
        h[3] = self.input_height.saturating_sub(1);
        h[4] = self.mode_param;
        h[5..7].copy_from_slice(&self.raw_width.to_le_bytes());
        h[7..9].copy_from_slice(&self.raw_height.to_le_bytes());
        h[9] = self.raw_format;
        h[10] = match self.bbox.len() {
            3 => 6,
            5 => 7,
            _ => 0,
        };
        for (i, v) in self.bbox.iter().take(5).enumerate() {
            h[16 + 4 * i..20 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        h.extend_from_slice(payload);
        h
    }
}

fn geometry(h: &[u8]) -> InputGeometry {
    let resize = match h[1] % 3 {
        0 => ResizeMode::Stretch,
        1 => ResizeMode::Letterbox { pad: h[4] },
        _ => ResizeMode::ResizeThenCenterCrop {
            ratio: 1.0 + f32::from(h[4]) / 85.0,
        },
    };
    let filter = match (h[1] / 3) % 3 {
        0 => ResizeFilter::Bilinear,
        1 => ResizeFilter::Bicubic,
        _ => ResizeFilter::Nearest,
    };
    InputGeometry {
        width: 1 + u32::from(h[2] % MAX_INPUT),
        height: 1 + u32::from(h[3] % MAX_INPUT),
        preprocess: Preprocess {
            color_order: if h[1] & 0x80 == 0 {
                ColorOrder::Rgb
            } else {
                ColorOrder::Bgr
            },
            scale: 1.0 / 255.0,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            resize,
            filter,
        },
    }
}

fn bbox(h: &[u8]) -> Vec<f64> {
    let n = match h[10] % 8 {
        6 => 3,
        7 => 5,
        _ => 4,
    };
    (0..n)
        .map(|i| {
            let b = [h[16 + 4 * i], h[17 + 4 * i], h[18 + 4 * i], h[19 + 4 * i]];
            f64::from(f32::from_le_bytes(b))
        })
        .collect()
}

pub fn run(data: &[u8]) {
    if data.len() < HEADER {
        return;
    }
    let (h, payload) = data.split_at(HEADER);
    let geometry = geometry(h);
    let mut pre = Preprocessor::new(geometry.clone());
    let mut rgb = vec![0u8; geometry.rgb_len()];
    let raw_width = u32::from(u16::from_le_bytes([h[5], h[6]]));
    let raw_height = u32::from(u16::from_le_bytes([h[7], h[8]]));
    let bbox = bbox(h);
    // The clip alone, on any frame size.
    if let Ok(rect) = clip_bbox(&bbox, raw_width, raw_height) {
        check_rect(rect, raw_width, raw_height);
    }
    let prepared = match h[0] % 3 {
        0 => decode_image(payload, &LIMITS).and_then(|img| {
            check_decoded(&img);
            resized(&mut pre, &img, None, &mut rgb)
        }),
        1 => {
            let format = [
                RawFormat::Rgb8,
                RawFormat::Bgr8,
                RawFormat::Rgba8,
                RawFormat::Gray8,
            ][usize::from(h[9] % 4)];
            raw_image(raw_width, raw_height, format, payload, &LIMITS).and_then(|img| {
                assert_eq!(img.dimensions(), (raw_width, raw_height));
                resized(&mut pre, &img, None, &mut rgb)
            })
        }
        _ => decode_image(payload, &LIMITS).and_then(|frame| {
            check_decoded(&frame);
            let rect = clip_bbox(&bbox, frame.width(), frame.height())?;
            check_rect(rect, frame.width(), frame.height());
            resized(&mut pre, &frame, Some(rect), &mut rgb)
        }),
    };
    if prepared.is_ok() {
        let mut tensor = vec![0f32; geometry.rgb_len()];
        pre.normalize_into(&rgb, &mut tensor);
        assert!(tensor.iter().all(|v| v.is_finite()));
    }
}

/// Resizing an image that decoded within the limits (or a box clipped to
/// it) never fails: a failure would answer a valid crop with an error.
fn resized<C: std::ops::Deref<Target = [u8]>>(
    pre: &mut Preprocessor,
    img: &ImageBuffer<Rgb<u8>, C>,
    rect: Option<CropRect>,
    rgb: &mut [u8],
) -> Result<(), VisionError> {
    if let Err(e) = pre.resize_into(img, rect, rgb) {
        panic!(
            "a {}x{} image with crop {rect:?} does not resize to {:?}: {e}",
            img.width(),
            img.height(),
            pre.geometry()
        );
    }
    Ok(())
}

/// A decoded image is within the limits it was decoded under.
fn check_decoded(img: &RgbImage) {
    let (w, h) = img.dimensions();
    assert!(w > 0 && h > 0, "decoded an empty {w}x{h} image");
    assert!(
        w <= LIMITS.max_dimension
            && h <= LIMITS.max_dimension
            && u64::from(w) * u64::from(h) <= LIMITS.max_pixels,
        "decoded a {w}x{h} image past the limits"
    );
}

/// A clipped box lies inside its frame and keeps at least a pixel a side.
fn check_rect(r: CropRect, width: u32, height: u32) {
    let ok = [r.x, r.y, r.width, r.height].iter().all(|v| v.is_finite())
        && r.x >= 0.0
        && r.y >= 0.0
        && r.width >= 1.0
        && r.height >= 1.0
        && r.x + r.width <= f64::from(width)
        && r.y + r.height <= f64::from(height);
    assert!(
        ok,
        "clipped box {r:?} is not inside the {width}x{height} frame"
    );
}
