//! Decoding with limits: encoded images (JPEG, PNG, BMP, WebP), raw pixel
//! buffers, and clipping detector boxes to a frame.
//!
//! Sizes are checked from the header before any pixel is decoded, so a
//! decompression bomb is refused without allocating its pixels.

use std::io::Cursor;

use std::borrow::Cow;

use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageFormat, Rgb, RgbImage};

use crate::config::LimitsConfig;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VisionError {
    #[error("image is {size} bytes, over the limit of {limit} (limits.max_image_bytes)")]
    TooManyBytes { size: usize, limit: usize },
    #[error("image is empty")]
    Empty,
    #[error("image format not recognised (expected JPEG, PNG, BMP or WebP)")]
    UnknownFormat,
    #[error("image format {0} is not accepted (expected JPEG, PNG, BMP or WebP)")]
    UnsupportedFormat(String),
    #[error("image is {width}x{height} pixels, over the limits (limits.max_dimension {max_dimension} per side, limits.max_pixels {max_pixels} in all)")]
    TooLarge {
        width: u32,
        height: u32,
        max_dimension: u32,
        max_pixels: u64,
    },
    #[error("image has zero width or height")]
    ZeroSize,
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error("raw {format} buffer of {width}x{height} needs {expected} bytes, got {actual}")]
    RawSize {
        format: &'static str,
        width: u32,
        height: u32,
        expected: usize,
        actual: usize,
    },
    #[error("bbox {0} is invalid: it needs 4 finite numbers [x, y, w, h] with w, h > 0")]
    BadBox(String),
    #[error("bbox {bbox:?} lies outside the {width}x{height} frame")]
    BoxOutsideFrame {
        bbox: [f64; 4],
        width: u32,
        height: u32,
    },
    #[error("cannot resize: {0}")]
    Resize(String),
    /// The request's frame, which this bbox refers to, is unusable.
    #[error("the request's frame is unusable: {0}")]
    Frame(String),
    #[error("bbox given but the request has no frame")]
    NoFrame,
}

/// Size limits applied to every image the agent decodes.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_bytes: usize,
    pub max_dimension: u32,
    pub max_pixels: u64,
}

impl From<&LimitsConfig> for DecodeLimits {
    fn from(l: &LimitsConfig) -> Self {
        Self {
            max_bytes: l.max_image_bytes,
            max_dimension: l.max_dimension,
            max_pixels: l.max_pixels,
        }
    }
}

impl Default for DecodeLimits {
    fn default() -> Self {
        (&LimitsConfig::default()).into()
    }
}

impl DecodeLimits {
    fn check_size(&self, width: u32, height: u32) -> Result<(), VisionError> {
        if width == 0 || height == 0 {
            return Err(VisionError::ZeroSize);
        }
        if width > self.max_dimension
            || height > self.max_dimension
            || u64::from(width) * u64::from(height) > self.max_pixels
        {
            return Err(VisionError::TooLarge {
                width,
                height,
                max_dimension: self.max_dimension,
                max_pixels: self.max_pixels,
            });
        }
        Ok(())
    }
}

/// Decodes an encoded JPEG, PNG, BMP or WebP image to RGB8.
pub fn decode_image(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, VisionError> {
    if bytes.is_empty() {
        return Err(VisionError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(VisionError::TooManyBytes {
            size: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| VisionError::UnknownFormat)?;
    if !matches!(
        format,
        ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Bmp | ImageFormat::WebP
    ) {
        return Err(VisionError::UnsupportedFormat(format!("{format:?}")));
    }
    // One pass over the header: the decoder says the size, which is checked
    // before any pixel is decoded. The allocation cap goes in before the
    // decoder is made (PNG's fixes its own cap then); the output buffer is
    // counted against it, as `ImageReader::decode` does.
    let decode_err = |e: image::ImageError| VisionError::Decode(e.to_string());
    let mut decoder_limits = image::Limits::default();
    // RGBA16 is the widest layout a decoder may produce, plus slack for its buffers.
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(1 << 24));
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    // Only the cap yet: a size over the limits is `TooLarge`, told below.
    reader.limits(decoder_limits.clone());
    let mut decoder = reader.into_decoder().map_err(decode_err)?;
    let (width, height) = decoder.dimensions();
    limits.check_size(width, height)?;
    decoder_limits.max_image_width = Some(limits.max_dimension);
    decoder_limits.max_image_height = Some(limits.max_dimension);
    decoder_limits
        .reserve(decoder.total_bytes())
        .map_err(decode_err)?;
    decoder.set_limits(decoder_limits).map_err(decode_err)?;
    let decoded = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    Ok(decoded.into_rgb8())
}

pub use crate::protocol::RawFormat;

/// An RGB8 image that borrows its pixels where it can.
pub type RgbView<'a> = ImageBuffer<Rgb<u8>, Cow<'a, [u8]>>;

/// Converts a raw pixel buffer to RGB8 (alpha is dropped, as Pillow's
/// `convert("RGB")` does). `rgb8` data is used in place, not copied.
pub fn raw_image<'a>(
    width: u32,
    height: u32,
    format: RawFormat,
    data: &'a [u8],
    limits: &DecodeLimits,
) -> Result<RgbView<'a>, VisionError> {
    limits.check_size(width, height)?;
    let pixels = width as usize * height as usize;
    let expected = pixels * format.bytes_per_pixel();
    if data.len() != expected {
        return Err(VisionError::RawSize {
            format: format.name(),
            width,
            height,
            expected,
            actual: data.len(),
        });
    }
    let rgb: Cow<'a, [u8]> = match format {
        RawFormat::Rgb8 => Cow::Borrowed(data),
        RawFormat::Bgr8 => data
            .chunks_exact(3)
            .flat_map(|p| [p[2], p[1], p[0]])
            .collect(),
        RawFormat::Rgba8 => data
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        RawFormat::Gray8 => data.iter().flat_map(|&g| [g, g, g]).collect(),
    };
    ImageBuffer::from_raw(width, height, rgb).ok_or(VisionError::ZeroSize)
}

/// A region of an image, in (possibly fractional) pixels, already clipped to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropRect {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
}

/// Clips a detector box `[x, y, w, h]` to a `width` x `height` frame. A box
/// that extends past the frame is clipped (detectors emit such boxes); one
/// with less than a pixel left is an error.
/// A bbox as sent, for an error: at most its first 4 numbers and its length.
fn describe_box(bbox: &[f64]) -> String {
    if bbox.len() <= 4 {
        format!("{bbox:?}")
    } else {
        format!("{:?}… ({} numbers)", &bbox[..4], bbox.len())
    }
}

pub fn clip_bbox(bbox: &[f64], width: u32, height: u32) -> Result<CropRect, VisionError> {
    let [x, y, w, h] = match bbox {
        [x, y, w, h] if bbox.iter().all(|v| v.is_finite()) && *w > 0.0 && *h > 0.0 => {
            [*x, *y, *w, *h]
        }
        _ => return Err(VisionError::BadBox(describe_box(bbox))),
    };
    let x0 = x.max(0.0);
    let y0 = y.max(0.0);
    let x1 = (x + w).min(f64::from(width));
    let y1 = (y + h).min(f64::from(height));
    if x1 - x0 < 1.0 || y1 - y0 < 1.0 {
        return Err(VisionError::BoxOutsideFrame {
            bbox: [x, y, w, h],
            width,
            height,
        });
    }
    Ok(CropRect {
        x: x0,
        y: y0,
        width: x1 - x0,
        height: y1 - y0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_pixel(width, height, image::Rgb([10, 20, 30]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn decodes_png_to_rgb() {
        let img = decode_image(&png(7, 5), &DecodeLimits::default()).unwrap();
        assert_eq!(img.dimensions(), (7, 5));
        assert_eq!(img.get_pixel(3, 3).0, [10, 20, 30]);
    }

    #[test]
    fn refuses_an_image_over_the_pixel_limit_before_decoding() {
        let limits = DecodeLimits {
            max_pixels: 100,
            ..DecodeLimits::default()
        };
        let err = decode_image(&png(20, 20), &limits).unwrap_err();
        assert!(
            matches!(
                err,
                VisionError::TooLarge {
                    width: 20,
                    height: 20,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn refuses_garbage_with_a_clear_error() {
        let err = decode_image(b"definitely not an image", &DecodeLimits::default()).unwrap_err();
        assert_eq!(err, VisionError::UnknownFormat);
        let mut truncated = png(16, 16);
        truncated.truncate(40);
        assert!(decode_image(&truncated, &DecodeLimits::default()).is_err());
    }

    #[test]
    fn rgb8_raw_pixels_are_used_in_place_not_copied() {
        let data: Vec<u8> = (0..2 * 3 * 3).collect();
        let img = raw_image(2, 3, RawFormat::Rgb8, &data, &DecodeLimits::default()).unwrap();
        assert!(matches!(img.as_raw(), Cow::Borrowed(_)));
        assert_eq!(img.as_raw().as_ptr(), data.as_ptr());
        assert_eq!(img.get_pixel(1, 2).0, [15, 16, 17]);
    }

    #[test]
    fn raw_buffers_convert_to_rgb() {
        let limits = DecodeLimits::default();
        let bgr = raw_image(1, 1, RawFormat::Bgr8, &[1, 2, 3], &limits).unwrap();
        assert_eq!(bgr.get_pixel(0, 0).0, [3, 2, 1]);
        let rgba = raw_image(1, 1, RawFormat::Rgba8, &[1, 2, 3, 4], &limits).unwrap();
        assert_eq!(rgba.get_pixel(0, 0).0, [1, 2, 3]);
        let gray = raw_image(1, 1, RawFormat::Gray8, &[9], &limits).unwrap();
        assert_eq!(gray.get_pixel(0, 0).0, [9, 9, 9]);
        let err = raw_image(2, 2, RawFormat::Rgb8, &[0; 11], &limits).unwrap_err();
        assert!(matches!(
            err,
            VisionError::RawSize {
                expected: 12,
                actual: 11,
                ..
            }
        ));
    }

    #[test]
    fn boxes_past_the_frame_are_clipped_and_empty_ones_refused() {
        let r = clip_bbox(&[-10.0, 90.0, 30.0, 30.0], 100, 100).unwrap();
        assert_eq!((r.x, r.y, r.width, r.height), (0.0, 90.0, 20.0, 10.0));
        assert!(clip_bbox(&[150.0, 0.0, 10.0, 10.0], 100, 100).is_err());
        assert!(clip_bbox(&[0.0, 0.0, 0.0, 10.0], 100, 100).is_err());
        assert!(clip_bbox(&[0.0, 0.0, 10.0], 100, 100).is_err());
        assert!(clip_bbox(&[0.0, f64::NAN, 10.0, 10.0], 100, 100).is_err());
    }
}
