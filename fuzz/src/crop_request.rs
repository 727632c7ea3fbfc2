//! CropRequest decoding as the pipeline does it: the encoding detected from
//! the first byte, the request decoded (here in both encodings, whatever
//! the first byte says), checked, and each crop's source read; the id
//! peeked from what does not decode, and the ErrorReport that answers it.

use retail_agent::config::Encoding;
use retail_agent::protocol::{
    self, CropRequest, CropSource, Item, ProtocolError, MAX_ECHOED_ID, MAX_ERROR_TEXT,
    MAX_REQUEST_ID,
};

/// `limits.max_crops` of the default config.
const MAX_CROPS: usize = 64;

/// Largest ErrorReport for a request that does not decode: a bounded
/// reason and a bounded id (each byte at most 6 once escaped in JSON, as
/// `\u0000`), a timestamp and the map around them.
const MAX_REPORT_BYTES: usize = 6 * (MAX_ERROR_TEXT + MAX_REQUEST_ID) + 128;

pub fn run(data: &[u8]) {
    let detected = protocol::detect_encoding(data).ok();
    let peeked = protocol::peek_request_id(data);
    if let Some(id) = &peeked {
        assert!(
            !id.is_empty() && id.len() <= MAX_REQUEST_ID,
            "peeked id of {} bytes",
            id.len()
        );
    }
    // The bus peeks at the first bytes of a payload too large to decode.
    if let Some(id) = protocol::peek_request_id(&data[..data.len() / 2]) {
        assert!(!id.is_empty() && id.len() <= MAX_REQUEST_ID);
    }
    for encoding in [Encoding::Json, Encoding::Msgpack] {
        match protocol::decode::<CropRequest>(data, encoding) {
            Ok(req) => {
                check_request(&req);
                // A decoded request has each field once, so the peeked id
                // (when there is one) is the request's.
                if detected == Some(encoding) {
                    if let Some(id) = &peeked {
                        assert_eq!(id, &req.request_id, "peek and decode disagree");
                    }
                }
            }
            Err(e) => check_report(encoding, peeked.clone(), &e),
        }
    }
}

/// What the pipeline reads of a decoded request.
fn check_request(req: &CropRequest) {
    match req.validate(MAX_CROPS) {
        Ok(()) => {
            assert!(!req.request_id.is_empty() && req.request_id.len() <= MAX_REQUEST_ID);
            assert!(!req.crops.is_empty() && req.crops.len() <= MAX_CROPS);
            assert!(req
                .camera_id
                .as_ref()
                .is_none_or(|c| c.len() <= MAX_ECHOED_ID));
        }
        Err(e) => {
            let id = (!req.request_id.is_empty() && req.request_id.len() <= MAX_REQUEST_ID)
                .then(|| req.request_id.clone());
            check_report(Encoding::Json, id, &e);
            return;
        }
    }
    for (i, crop) in req.crops.iter().enumerate() {
        let id = req.crop_id(i);
        assert!(id.len() <= MAX_ECHOED_ID, "crop id of {} bytes", id.len());
        match crop.source() {
            Ok(CropSource::Bbox(b)) => {
                assert!(crop.has_bbox());
                std::hint::black_box(b);
            }
            Ok(CropSource::Image(bytes)) => {
                assert!(!crop.has_bbox());
                std::hint::black_box(bytes);
            }
            Ok(CropSource::Raw(raw)) => {
                assert!(!crop.has_bbox());
                std::hint::black_box(raw);
            }
            Err(why) => {
                let item = Item::error(id, why);
                let text = item.error.as_deref().unwrap_or_default();
                assert!(
                    text.len() <= MAX_ERROR_TEXT,
                    "item error of {} bytes",
                    text.len()
                );
            }
        }
    }
}

/// The ErrorReport that answers a request that cannot be handled fits
/// well inside a packet, whatever the input quoted in its reason.
fn check_report(encoding: Encoding, request_id: Option<String>, e: &ProtocolError) {
    let out = retail_agent::pipeline::error_message(encoding, request_id, e.to_string(), None);
    let retail_agent::bus::Outbound::Error { payload, .. } = out else {
        panic!("an ErrorReport is an Outbound::Error: {out:?}");
    };
    assert!(
        payload.len() <= MAX_REPORT_BYTES,
        "ErrorReport of {} bytes",
        payload.len()
    );
}
