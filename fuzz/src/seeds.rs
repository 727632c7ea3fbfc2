//! The seed corpus: a handful of small, valid inputs per target (and a few
//! near misses), written to `corpus/<target>/` by `examples/gen_corpus.rs`.
//! Deterministic, so regenerating gives the same files.

use std::io::Cursor;

use image::{ImageFormat, Rgb, RgbImage};
use retail_agent::config::Encoding;
use retail_agent::protocol::{Bytes, RefUpdate, UpdateOp};
use rmpv::Value;
use serde_json::json;

use crate::image_path::{Header, Source};
use crate::signed_update::{self as su, KEY_ID, MODE_BODY, MODE_ENVELOPE, MODE_STRUCTURED};

/// One seed: its target, file name and bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

pub fn all() -> Vec<Seed> {
    let mut out = crop_request();
    out.extend(signed_update());
    out.extend(image_path());
    out
}

/// A small image with some structure (a gradient), so resizing has work.
fn picture(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, 128])
    })
}

fn encoded(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format)
        .expect("a small image encodes");
    out
}

fn png(width: u32, height: u32) -> Vec<u8> {
    encoded(&picture(width, height), ImageFormat::Png)
}

fn seed(target: &'static str, name: &'static str, bytes: Vec<u8>) -> Seed {
    Seed {
        target,
        name,
        bytes,
    }
}

fn crop_request() -> Vec<Seed> {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let image = png(4, 3);
    let frame = png(16, 12);
    let json = json!({
        "request_id": "r-1",
        "camera_id": "cam-7",
        "frame_id": 42,
        "ts_ms": 1_700_000_000_000u64,
        "top_k": 3,
        "frame": b64(&frame),
        "crops": [
            {"id": "a", "image": b64(&image)},
            {"id": "b", "raw": {"width": 2, "height": 1, "format": "bgr8", "data": b64(&[1, 2, 3, 4, 5, 6])}},
            {"id": "c", "bbox": [1.5, 2, 8, 6]},
            {"image": "not base64!"},
            {"raw": {"width": 1, "height": 1, "format": "cmyk", "data": ""}},
        ],
    });
    let json_bytes = serde_json::to_vec(&json).expect("json encodes");
    let map = |entries: Vec<(&str, Value)>| {
        Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    };
    let msgpack = map(vec![
        ("request_id", "r-2".into()),
        ("camera_id", "cam-8".into()),
        ("top_k", 25.into()),
        ("frame", Value::Binary(frame.clone())),
        (
            "crops",
            Value::Array(vec![
                map(vec![("id", "a".into()), ("image", Value::Binary(image))]),
                map(vec![(
                    "raw",
                    map(vec![
                        ("width", 1.into()),
                        ("height", 2.into()),
                        ("format", "gray8".into()),
                        ("data", Value::Binary(vec![9, 10])),
                    ]),
                )]),
                map(vec![(
                    "bbox",
                    Value::Array(vec![0.into(), 0.into(), 4.5.into(), 4.into()]),
                )]),
                map(vec![("image", "AAEC".into()), ("bbox", Value::Nil)]),
                7.into(),
            ]),
        ),
    ]);
    let mut mp_bytes = Vec::new();
    rmpv::encode::write_value(&mut mp_bytes, &msgpack).expect("msgpack encodes");
    let mut cut = mp_bytes.clone();
    cut.truncate(40);
    vec![
        seed("crop_request", "json_all_sources", json_bytes),
        seed("crop_request", "msgpack_all_sources", mp_bytes),
        seed("crop_request", "msgpack_cut_off", cut),
        seed(
            "crop_request",
            "json_no_crops",
            br#"{"request_id":"r-3","crops":[],"top_k":"x"}"#.to_vec(),
        ),
    ]
}

fn update() -> RefUpdate {
    RefUpdate {
        update_id: "u-1".into(),
        fleet: su::FLEET.into(),
        target: Some(su::DEVICE.into()),
        base_version: Some(su::DB_VERSION),
        version: su::DB_VERSION + 1,
        issued_ms: 1_000,
        expires_ms: Some(su::NOW_MS + 1),
        ops: vec![
            UpdateOp::Clear,
            UpdateOp::Upsert {
                ref_id: "r1".into(),
                label: "cola".into(),
                image: Some(Bytes(png(4, 4))),
                embedding: None,
                model_fingerprint: None,
            },
            UpdateOp::Upsert {
                ref_id: "r2".into(),
                label: "soda".into(),
                image: None,
                embedding: Some(vec![0.5, -0.5, 0.25, 1.0]),
                model_fingerprint: Some(su::FINGERPRINT.into()),
            },
            UpdateOp::Delete {
                ref_id: "r0".into(),
            },
            UpdateOp::DeleteLabel {
                label: "old".into(),
            },
        ],
    }
}

fn signed_update() -> Vec<Seed> {
    let body = rmp_serde::to_vec_named(&update()).expect("an update encodes");
    let with_mode = |mode: u8, rest: &[u8]| {
        let mut v = vec![mode];
        v.extend_from_slice(rest);
        v
    };
    let msgpack = su::envelope(body.clone(), KEY_ID, Encoding::Msgpack);
    let json = su::envelope(body.clone(), KEY_ID, Encoding::Json);
    let mut tampered = msgpack.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let mut stale = update();
    stale.update_id = su::APPLIED_ID.into();
    stale.base_version = None;
    let stale_body = rmp_serde::to_vec_named(&stale).expect("an update encodes");
    let mut body_seed = vec![su::body_options(Encoding::Msgpack, KEY_ID)];
    body_seed.extend_from_slice(&body);
    let mut unknown_key = vec![su::body_options(Encoding::Json, su::UNKNOWN_KEY_ID)];
    unknown_key.extend_from_slice(&stale_body);
    // Arbitrary's bytes: ids, versions and a few ops of each kind.
    let structured: Vec<u8> = (0u8..=255).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    vec![
        seed(
            "signed_update",
            "envelope_msgpack",
            with_mode(MODE_ENVELOPE, &msgpack),
        ),
        seed(
            "signed_update",
            "envelope_json",
            with_mode(MODE_ENVELOPE, &json),
        ),
        seed(
            "signed_update",
            "envelope_tampered",
            with_mode(MODE_ENVELOPE, &tampered),
        ),
        seed(
            "signed_update",
            "body_msgpack",
            with_mode(MODE_BODY, &body_seed),
        ),
        seed(
            "signed_update",
            "body_unknown_key",
            with_mode(MODE_BODY, &unknown_key),
        ),
        seed(
            "signed_update",
            "structured",
            with_mode(MODE_STRUCTURED, &structured),
        ),
        seed(
            "signed_update",
            "structured_small",
            with_mode(
                MODE_STRUCTURED,
                &[1, 3, b'u', b'-', b'9', 0, 1, 6, 0, 5, 2, 0, 3],
            ),
        ),
    ]
}

fn image_path() -> Vec<Seed> {
    let header = |source, mode, filter, size: u8, bbox: Vec<f32>| Header {
        source,
        mode,
        filter,
        input_width: size,
        input_height: size - 2,
        mode_param: 10,
        raw_width: 3,
        raw_height: 2,
        raw_format: 0,
        bbox,
    };
    let pic = picture(24, 16);
    let small = picture(8, 8);
    let boxed = vec![2.0, 3.0, 10.5, 8.0];
    let mut raw = header(Source::Raw, 0, 2, 8, boxed.clone());
    raw.raw_format = 1;
    vec![
        seed(
            "image_path",
            "png_stretch",
            header(Source::Encoded, 0, 0, 8, boxed.clone()).frame(&encoded(&pic, ImageFormat::Png)),
        ),
        seed(
            "image_path",
            "jpeg_letterbox",
            header(Source::Encoded, 1, 1, 12, boxed.clone())
                .frame(&encoded(&small, ImageFormat::Jpeg)),
        ),
        seed(
            "image_path",
            "bmp_center_crop",
            header(Source::Encoded, 2, 0, 6, boxed.clone())
                .frame(&encoded(&small, ImageFormat::Bmp)),
        ),
        seed(
            "image_path",
            "webp_stretch",
            header(Source::Encoded, 0, 2, 5, boxed.clone())
                .frame(&encoded(&small, ImageFormat::WebP)),
        ),
        seed(
            "image_path",
            "raw_bgr8",
            raw.frame(&[
                1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,
            ]),
        ),
        seed(
            "image_path",
            "bbox_png_frame",
            header(Source::Bbox, 1, 0, 10, boxed).frame(&encoded(&pic, ImageFormat::Png)),
        ),
        seed(
            "image_path",
            "bbox_past_the_frame",
            header(Source::Bbox, 2, 1, 7, vec![-5.0, 10.0, 40.0, 40.0])
                .frame(&encoded(&pic, ImageFormat::Png)),
        ),
    ]
}
