//! The bench's inputs, made from the synthetic product images that ship in
//! the binary: 224x224 JPEG crops (each query image of
//! testdata/synthetic/queries stretched to 224x224), a 1920x1080 JPEG shelf
//! frame with product boxes, and crop requests as a checkout client sends
//! them (MessagePack, one JPEG per crop).

use image::imageops::{self, FilterType};
use image::{Rgb, RgbImage};
use serde::Serialize;

use super::BenchError;
use crate::vision::decode::{decode_image, DecodeLimits};

/// Side of the square crops.
pub const CROP_SIDE: u32 = 224;
pub const FRAME_WIDTH: u32 = 1920;
pub const FRAME_HEIGHT: u32 = 1080;
/// JPEG quality of the crops and the frame (a camera's usual setting).
const JPEG_QUALITY: u8 = 90;
/// Products per shelf row in the frame, and rows.
const FRAME_COLUMNS: u32 = 7;
const FRAME_ROWS: u32 = 2;
/// Size of a product in the frame (a box a detector would cut).
const PRODUCT_WIDTH: u32 = 220;
const PRODUCT_HEIGHT: u32 = 400;

pub struct Workload {
    /// JPEG-encoded 224x224 crops.
    pub crops: Vec<Vec<u8>>,
    /// A JPEG-encoded 1920x1080 frame.
    pub frame: Vec<u8>,
    /// The products' boxes in the frame, `[x, y, w, h]` as the contract sends them.
    pub boxes: Vec<[f64; 4]>,
}

#[derive(Serialize)]
struct RequestOut<'a> {
    request_id: &'a str,
    crops: Vec<CropOut<'a>>,
}

#[derive(Serialize)]
struct CropOut<'a> {
    #[serde(with = "serde_bytes")]
    image: &'a [u8],
}

impl Workload {
    pub fn new() -> Result<Self, BenchError> {
        let limits = DecodeLimits::default();
        let products: Vec<RgbImage> = crate::demo::DEMO_QUERIES
            .iter()
            .map(|(_, _, bytes)| decode_image(bytes, &limits))
            .collect::<Result<_, _>>()?;
        if products.is_empty() {
            return Err(BenchError::Enrol(
                "the binary carries no synthetic query images".into(),
            ));
        }
        let crops = products
            .iter()
            .map(|p| {
                jpeg(&imageops::resize(
                    p,
                    CROP_SIDE,
                    CROP_SIDE,
                    FilterType::Triangle,
                ))
            })
            .collect::<Result<_, _>>()?;
        let (frame, boxes) = shelf_frame(&products)?;
        Ok(Self {
            crops,
            frame,
            boxes,
        })
    }

    /// Mean bytes of a crop.
    pub fn mean_crop_bytes(&self) -> f64 {
        self.crops.iter().map(Vec::len).sum::<usize>() as f64 / self.crops.len().max(1) as f64
    }

    /// A MessagePack crop request `request_id` with `crops` crops, the
    /// first being crop number `first` (cycling through them).
    pub fn request(
        &self,
        request_id: &str,
        first: usize,
        crops: usize,
    ) -> Result<Vec<u8>, BenchError> {
        let crops = (0..crops)
            .map(|k| CropOut {
                image: &self.crops[(first + k) % self.crops.len()],
            })
            .collect();
        rmp_serde::to_vec_named(&RequestOut { request_id, crops })
            .map_err(|e| BenchError::Encode(e.to_string()))
    }
}

fn jpeg(img: &RgbImage) -> Result<Vec<u8>, BenchError> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY).encode_image(img)?;
    Ok(out)
}

/// Products on two shelves in front of a textured background, and their boxes.
fn shelf_frame(products: &[RgbImage]) -> Result<(Vec<u8>, Vec<[f64; 4]>), BenchError> {
    let shelf_height = FRAME_HEIGHT / FRAME_ROWS;
    let mut frame = RgbImage::from_fn(FRAME_WIDTH, FRAME_HEIGHT, |x, y| {
        // A gradient with a fine texture, and a dark shelf edge under each row.
        let in_shelf = y % shelf_height;
        if in_shelf >= shelf_height - 24 {
            return Rgb([60, 52, 44]);
        }
        let texture = ((x * 7 + y * 13) % 23) as u8;
        Rgb([
            150u8.saturating_add(texture) - (y / 20) as u8,
            150u8.saturating_add(texture / 2),
            140u8.saturating_add((x / 30) as u8 % 40),
        ])
    });
    let cell_width = FRAME_WIDTH / FRAME_COLUMNS;
    let mut boxes = Vec::new();
    for row in 0..FRAME_ROWS {
        for column in 0..FRAME_COLUMNS {
            let index = (row * FRAME_COLUMNS + column) as usize % products.len();
            let product = imageops::resize(
                &products[index],
                PRODUCT_WIDTH,
                PRODUCT_HEIGHT,
                FilterType::Triangle,
            );
            let x = column * cell_width + (cell_width - PRODUCT_WIDTH) / 2;
            let y = row * shelf_height + (shelf_height - 24 - PRODUCT_HEIGHT);
            imageops::overlay(&mut frame, &product, i64::from(x), i64::from(y));
            boxes.push([
                f64::from(x),
                f64::from(y),
                f64::from(PRODUCT_WIDTH),
                f64::from(PRODUCT_HEIGHT),
            ]);
        }
    }
    Ok((jpeg(&frame)?, boxes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_are_224_jpegs_and_the_boxes_lie_in_the_frame() {
        let w = Workload::new().expect("workload");
        let limits = DecodeLimits::default();
        let crop = decode_image(&w.crops[0], &limits).expect("crop decodes");
        assert_eq!(crop.dimensions(), (CROP_SIDE, CROP_SIDE));
        let frame = decode_image(&w.frame, &limits).expect("frame decodes");
        assert_eq!(frame.dimensions(), (FRAME_WIDTH, FRAME_HEIGHT));
        assert_eq!(w.boxes.len(), (FRAME_COLUMNS * FRAME_ROWS) as usize);
        for b in &w.boxes {
            assert!(b[0] + b[2] <= f64::from(FRAME_WIDTH), "{b:?}");
            assert!(b[1] + b[3] <= f64::from(FRAME_HEIGHT), "{b:?}");
        }
    }

    #[test]
    fn a_request_reads_back_as_the_contract_s_crop_request() {
        let w = Workload::new().expect("workload");
        let payload = w.request("r7", 3, 2).expect("request");
        let req: crate::protocol::CropRequest =
            crate::protocol::decode(&payload, crate::config::Encoding::Msgpack).expect("decodes");
        assert_eq!(req.request_id, "r7");
        assert_eq!(req.crops.len(), 2);
        assert!(matches!(
            req.crops[0].source(),
            Ok(crate::protocol::CropSource::Image(b)) if b == w.crops[3].as_slice()
        ));
    }
}
