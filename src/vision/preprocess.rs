//! Resize and normalise: from an RGB image (or a box of it) to one slot of the
//! NCHW batch tensor, as the model's manifest prescribes.
//!
//! Resizing is split from normalising so the pipeline can resize on worker
//! threads into a compact RGB8 buffer and let the inference thread write the
//! f32 values straight into its batch tensor: the image is copied once.
//! The bilinear filter is fast_image_resize's convolution resizer, which
//! follows Pillow's antialiased algorithm (what TAO trains with).

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use std::ops::Deref;

use image::{ImageBuffer, Rgb, RgbImage};

use super::decode::{CropRect, VisionError};
use crate::manifest::{ColorOrder, Preprocess, ResizeFilter, ResizeMode};

/// Geometry and normalisation of one model input; cheap to clone.
#[derive(Debug, Clone)]
pub struct InputGeometry {
    pub width: u32,
    pub height: u32,
    pub preprocess: Preprocess,
}

impl InputGeometry {
    /// Bytes of one resized RGB8 image.
    pub fn rgb_len(&self) -> usize {
        self.width as usize * self.height as usize * 3
    }
}

/// Resizes crops to the model's input size. Holds the resizer's scratch
/// buffers, so keep one per thread.
pub struct Preprocessor {
    geometry: InputGeometry,
    resizer: Resizer,
    scratch: Vec<u8>,
    normalizer: Normalizer,
}

impl Preprocessor {
    pub fn new(geometry: InputGeometry) -> Self {
        let normalizer = Normalizer::new(&geometry.preprocess);
        Self {
            geometry,
            resizer: Resizer::new(),
            scratch: Vec::new(),
            normalizer,
        }
    }

    pub fn geometry(&self) -> &InputGeometry {
        &self.geometry
    }

    /// Resizes `src` (or the `crop` of it) into `dst`, an RGB8 buffer of
    /// exactly [`InputGeometry::rgb_len`] bytes.
    pub fn resize_into<C: Deref<Target = [u8]>>(
        &mut self,
        src: &ImageBuffer<Rgb<u8>, C>,
        crop: Option<CropRect>,
        dst: &mut [u8],
    ) -> Result<(), VisionError> {
        let (w, h) = (self.geometry.width, self.geometry.height);
        if dst.len() != self.geometry.rgb_len() {
            return Err(VisionError::Resize(format!(
                "destination holds {} bytes, expected {}",
                dst.len(),
                self.geometry.rgb_len()
            )));
        }
        let crop = crop.unwrap_or(CropRect {
            x: 0.0,
            y: 0.0,
            width: f64::from(src.width()),
            height: f64::from(src.height()),
        });
        let filter = self.geometry.preprocess.filter;
        match self.geometry.preprocess.resize {
            ResizeMode::Stretch => resize(&mut self.resizer, src, crop, filter, w, h, dst),
            ResizeMode::ResizeThenCenterCrop { ratio } => {
                let rw = (f64::from(w) * f64::from(ratio)).round().max(f64::from(w)) as u32;
                let rh = (f64::from(h) * f64::from(ratio)).round().max(f64::from(h)) as u32;
                self.scratch.resize(rw as usize * rh as usize * 3, 0);
                resize(
                    &mut self.resizer,
                    src,
                    crop,
                    filter,
                    rw,
                    rh,
                    &mut self.scratch,
                )?;
                let off_x = center_offset(rw, w);
                let off_y = center_offset(rh, h);
                copy_region(&self.scratch, rw, off_x, off_y, dst, w, h, 0, 0, w, h);
                Ok(())
            }
            ResizeMode::Letterbox { pad } => {
                let scale = (f64::from(w) / crop.width).min(f64::from(h) / crop.height);
                let nw = ((crop.width * scale).round() as u32).clamp(1, w);
                let nh = ((crop.height * scale).round() as u32).clamp(1, h);
                self.scratch.resize(nw as usize * nh as usize * 3, 0);
                resize(
                    &mut self.resizer,
                    src,
                    crop,
                    filter,
                    nw,
                    nh,
                    &mut self.scratch,
                )?;
                dst.fill(pad);
                let (ox, oy) = ((w - nw) / 2, (h - nh) / 2);
                copy_region(&self.scratch, nw, 0, 0, dst, w, h, ox, oy, nw, nh);
                Ok(())
            }
        }
    }

    /// Writes the normalised NCHW planes of a resized RGB8 image into `dst`
    /// (3 planes of width x height values).
    pub fn normalize_into(&self, rgb: &[u8], dst: &mut [f32]) {
        self.normalizer.apply(rgb, dst);
    }

    /// Resize then normalise one image into its tensor slot; a convenience
    /// for offline work where no pipeline splits the two steps.
    pub fn prepare(
        &mut self,
        src: &RgbImage,
        crop: Option<CropRect>,
        rgb_scratch: &mut Vec<u8>,
        dst: &mut [f32],
    ) -> Result<(), VisionError> {
        rgb_scratch.resize(self.geometry.rgb_len(), 0);
        self.resize_into(src, crop, rgb_scratch)?;
        self.normalize_into(rgb_scratch, dst);
        Ok(())
    }
}

/// Per-channel lookup tables from a 0–255 value to its normalised f32,
/// computed in f64 so they match `(x * scale - mean) / std` exactly.
#[derive(Debug, Clone)]
pub struct Normalizer {
    /// `lut[c]` is for tensor channel `c`; `source[c]` is the RGB component it reads.
    lut: [[f32; 256]; 3],
    source: [usize; 3],
}

impl Normalizer {
    pub fn new(p: &Preprocess) -> Self {
        let source = match p.color_order {
            ColorOrder::Rgb => [0, 1, 2],
            ColorOrder::Bgr => [2, 1, 0],
        };
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            let (mean, std) = (f64::from(p.mean[c]), f64::from(p.std[c]));
            for (x, v) in table.iter_mut().enumerate() {
                *v = ((x as f64 * f64::from(p.scale) - mean) / std) as f32;
            }
        }
        Self { lut, source }
    }

    /// `rgb` is interleaved RGB8, `dst` receives 3 planes of `rgb.len() / 3`.
    pub fn apply(&self, rgb: &[u8], dst: &mut [f32]) {
        let plane = rgb.len() / 3;
        let (p0, rest) = dst.split_at_mut(plane);
        let (p1, p2) = rest.split_at_mut(plane);
        let [s0, s1, s2] = self.source;
        let [l0, l1, l2] = &self.lut;
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            p0[i] = l0[px[s0] as usize];
            p1[i] = l1[px[s1] as usize];
            p2[i] = l2[px[s2] as usize];
        }
    }
}

/// torchvision's CenterCrop offset: `int(round((size - crop) / 2))`, with
/// Python's round-half-to-even.
fn center_offset(size: u32, crop: u32) -> u32 {
    let diff = size - crop;
    let half = diff / 2;
    if diff % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

fn resize<C: Deref<Target = [u8]>>(
    resizer: &mut Resizer,
    src: &ImageBuffer<Rgb<u8>, C>,
    crop: CropRect,
    filter: ResizeFilter,
    width: u32,
    height: u32,
    dst: &mut [u8],
) -> Result<(), VisionError> {
    let err = |e: &dyn std::fmt::Display| VisionError::Resize(e.to_string());
    let src_view =
        ImageRef::new(src.width(), src.height(), src, PixelType::U8x3).map_err(|e| err(&e))?;
    let mut dst_view =
        Image::from_slice_u8(width, height, dst, PixelType::U8x3).map_err(|e| err(&e))?;
    let alg = match filter {
        ResizeFilter::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
        ResizeFilter::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
        ResizeFilter::Nearest => ResizeAlg::Nearest,
    };
    let options =
        ResizeOptions::new()
            .resize_alg(alg)
            .crop(crop.x, crop.y, crop.width, crop.height);
    resizer
        .resize(&src_view, &mut dst_view, &options)
        .map_err(|e| err(&e))
}

/// Copies a `w` x `h` block of RGB8 pixels from `src` (row length `src_w`)
/// at (`sx`, `sy`) to `dst` (`dst_w` x `dst_h`) at (`dx`, `dy`).
#[allow(clippy::too_many_arguments)]
fn copy_region(
    src: &[u8],
    src_w: u32,
    sx: u32,
    sy: u32,
    dst: &mut [u8],
    dst_w: u32,
    dst_h: u32,
    dx: u32,
    dy: u32,
    w: u32,
    h: u32,
) {
    debug_assert!(dy + h <= dst_h && dx + w <= dst_w);
    let row = w as usize * 3;
    for r in 0..h as usize {
        let s = ((sy as usize + r) * src_w as usize + sx as usize) * 3;
        let d = ((dy as usize + r) * dst_w as usize + dx as usize) * 3;
        dst[d..d + row].copy_from_slice(&src[s..s + row]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(resize: ResizeMode, order: ColorOrder) -> InputGeometry {
        InputGeometry {
            width: 4,
            height: 4,
            preprocess: Preprocess {
                color_order: order,
                scale: 1.0 / 255.0,
                mean: [0.5, 0.25, 0.0],
                std: [0.5, 0.25, 1.0],
                resize,
                filter: ResizeFilter::Bilinear,
            },
        }
    }

    #[test]
    fn center_offset_rounds_half_to_even_like_torchvision() {
        assert_eq!(center_offset(255, 224), 16); // round(15.5) = 16
        assert_eq!(center_offset(253, 224), 14); // round(14.5) = 14
        assert_eq!(center_offset(256, 224), 16);
    }

    #[test]
    fn normalisation_follows_channel_order() {
        let p = Preprocessor::new(geometry(ResizeMode::Stretch, ColorOrder::Bgr));
        let rgb = [255u8, 0, 51].repeat(16);
        let mut out = vec![0f32; 48];
        p.normalize_into(&rgb, &mut out);
        // channel 0 reads B (51): (0.2 - 0.5) / 0.5
        assert!((out[0] - (-0.6)).abs() < 1e-6);
        // channel 2 reads R (255): (1 - 0) / 1
        assert!((out[32] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn letterbox_pads_around_a_wide_image() {
        let mut p = Preprocessor::new(geometry(ResizeMode::Letterbox { pad: 7 }, ColorOrder::Rgb));
        let src = RgbImage::from_pixel(8, 4, image::Rgb([200, 200, 200]));
        let mut dst = vec![0u8; 48];
        p.resize_into(&src, None, &mut dst).unwrap();
        assert_eq!(&dst[..12], &[7u8; 12]); // first row is padding
        assert_eq!(&dst[12..24], &[200u8; 12]);
        assert_eq!(&dst[36..48], &[7u8; 12]); // last row is padding
    }
}
