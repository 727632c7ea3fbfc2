//! Per-crop stage costs, each the mean over many runs on one thread:
//! reading an 8-crop MessagePack request (its crops borrowed, not copied);
//! JPEG decode of a 224x224 crop and its resize+normalise into a tensor
//! slot; JPEG decode of a 1920x1080 frame (once per frame, not per crop)
//! and the resize+normalise of a product box cut from it; and the search of
//! one embedding in the reference DB the pipeline and end-to-end sections
//! serve (the synthetic products' 120 references, embedded by this model).
//!
//! Not measured: inference (see `inference`), queueing, batching, the bus;
//! search against large reference sets (see `search`).

use serde::Serialize;

use super::{micros_per_run, repeat_for, search::search_queries, BenchError, BenchSetup};
use crate::config::Encoding;
use crate::protocol::{self, CropRequest};
use crate::recognizer::geometry;
use crate::vision::decode::{clip_bbox, decode_image};
use crate::vision::preprocess::Preprocessor;

/// Crops in the request whose reading is measured.
const REQUEST_CROPS: usize = 8;

#[derive(Debug, Clone, Serialize)]
pub struct StageFigures {
    /// Reading (and checking) one 8-crop MessagePack CropRequest.
    pub request_bytes: usize,
    pub request_read_us: f64,
    pub crop_bytes_mean: f64,
    pub crop_decode_us: f64,
    pub crop_resize_normalise_us: f64,
    pub frame_bytes: usize,
    pub frame_decode_us: f64,
    pub bbox_resize_normalise_us: f64,
    /// Searching one embedding among `search_refs` references.
    pub search_us: f64,
    pub search_refs: usize,
}

pub fn measure(setup: &BenchSetup) -> Result<StageFigures, BenchError> {
    let d = setup.durations;
    let w = &setup.workload;
    let mut pre = Preprocessor::new(geometry(&setup.manifest));
    let per_image = pre.geometry().rgb_len();
    let (mut rgb, mut tensor) = (Vec::new(), vec![0f32; per_image]);

    let request = w.request("stage", 0, REQUEST_CROPS)?;
    let (runs, t) = repeat_for(d.stage_window, 10, || {
        let req: CropRequest<'_> = protocol::decode(&request, Encoding::Msgpack)?;
        req.validate(REQUEST_CROPS)?;
        std::hint::black_box(req.crops.iter().filter(|c| c.source().is_ok()).count());
        Ok::<(), BenchError>(())
    })?;
    let request_read_us = micros_per_run(runs, t);

    let mut i = 0;
    let (runs, t) = repeat_for(d.stage_window, 10, || {
        i += 1;
        decode_image(&w.crops[i % w.crops.len()], &setup.limits).map(drop)
    })?;
    let crop_decode_us = micros_per_run(runs, t);

    let decoded = w
        .crops
        .iter()
        .map(|c| decode_image(c, &setup.limits))
        .collect::<Result<Vec<_>, _>>()?;
    let (runs, t) = repeat_for(d.stage_window, 10, || {
        i += 1;
        pre.prepare(&decoded[i % decoded.len()], None, &mut rgb, &mut tensor)
    })?;
    let crop_resize_normalise_us = micros_per_run(runs, t);

    let (runs, t) = repeat_for(d.stage_window, 3, || {
        decode_image(&w.frame, &setup.limits).map(drop)
    })?;
    let frame_decode_us = micros_per_run(runs, t);

    let frame = decode_image(&w.frame, &setup.limits)?;
    let boxes = w
        .boxes
        .iter()
        .map(|b| clip_bbox(b, frame.width(), frame.height()))
        .collect::<Result<Vec<_>, _>>()?;
    let (runs, t) = repeat_for(d.stage_window, 10, || {
        i += 1;
        pre.prepare(&frame, Some(boxes[i % boxes.len()]), &mut rgb, &mut tensor)
    })?;
    let bbox_resize_normalise_us = micros_per_run(runs, t);

    // Search: the served DB, queried with the crops' own embeddings.
    let state = setup.state_dir("stages")?;
    let (db, mut recognizer) = setup.enrol_demo_references(&state)?;
    let crops: Vec<&[u8]> = w.crops.iter().map(Vec::as_slice).collect();
    let queries: Vec<f32> = recognizer
        .embed_encoded(&crops)
        .into_iter()
        .map(|r| r.map(|e| e.embedding))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BenchError::Enrol(e.to_string()))?
        .concat();
    let snapshot = db.snapshot();
    let index = &snapshot.index;
    let (top_k, threshold) = (
        setup.cfg.config.recognition.top_k,
        setup.cfg.config.recognition.unknown_threshold,
    );
    let dim = index.dim().max(1);
    let n = queries.len() / dim;
    let (runs, t) = repeat_for(d.stage_window, 10, || {
        i += 1;
        let q = &queries[(i % n) * dim..(i % n + 1) * dim];
        std::hint::black_box(search_queries(index, q, top_k, threshold));
        Ok::<(), BenchError>(())
    })?;
    let search_us = micros_per_run(runs, t);

    Ok(StageFigures {
        request_bytes: request.len(),
        request_read_us,
        crop_bytes_mean: w.mean_crop_bytes(),
        crop_decode_us,
        crop_resize_normalise_us,
        frame_bytes: w.frame.len(),
        frame_decode_us,
        bbox_resize_normalise_us,
        search_us,
        search_refs: index.len(),
    })
}
