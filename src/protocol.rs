//! The MQTT contract's payloads (`shared/spec/PROTOCOL.md`, v1): their
//! types, the encoding detection, and JSON/MessagePack (de)serialisation.
//!
//! Binary fields are MessagePack `bin` or, in JSON, standard base64 strings;
//! [`Bytes`] reads both and writes whichever the target format calls for.
//! Owns no I/O and no behaviour beyond checking a message's shape.

use std::sync::Arc;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::config::Encoding;
use crate::vision::RawFormat;

/// Longest `request_id`, in bytes.
pub const MAX_REQUEST_ID: usize = 128;
/// Largest `top_k` honoured; larger values are clamped.
pub const MAX_TOP_K: usize = 20;
/// Longest `camera_id` or crop `id` echoed in a result, in bytes.
pub const MAX_ECHOED_ID: usize = 256;
/// Longest error text in an Item or ErrorReport, in bytes: texts quoting
/// the input are cut to this.
pub const MAX_ERROR_TEXT: usize = 1024;

/// At most `max` bytes of untrusted `s` (cut at a character boundary), to
/// quote in an error or ack without echoing a huge string.
pub fn excerpt(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `text` cut to [`MAX_ERROR_TEXT`] bytes (at a character boundary), saying
/// how much was left out.
pub fn bounded_text(mut text: String) -> String {
    if text.len() > MAX_ERROR_TEXT {
        let total = text.len();
        let end = excerpt(&text, MAX_ERROR_TEXT - 64).len();
        text.truncate(end);
        text.push_str(&format!("… ({} more bytes cut)", total - end));
    }
    text
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("payload is empty")]
    Empty,
    #[error(
        "payload is neither JSON (starts with '{{') nor a MessagePack map (first byte 0x{0:02x})"
    )]
    UnknownEncoding(u8),
    #[error("malformed {encoding} payload: {message}")]
    Malformed {
        encoding: &'static str,
        message: String,
    },
    #[error("request_id must be 1 to {MAX_REQUEST_ID} bytes, got {0}")]
    RequestId(usize),
    #[error("crops must hold 1 to {max} crops, got {got}")]
    CropCount { got: usize, max: usize },
    #[error("{field} must be at most {MAX_ECHOED_ID} bytes, got {len}")]
    EchoedTooLong { field: String, len: usize },
}

/// Detects a payload's encoding from its first byte, as the contract says.
pub fn detect_encoding(payload: &[u8]) -> Result<Encoding, ProtocolError> {
    let first = payload
        .iter()
        .copied()
        .find(|b| !b" \t\r\n".contains(b))
        .ok_or(ProtocolError::Empty)?;
    match first {
        b'{' => Ok(Encoding::Json),
        0x80..=0x8f | 0xde | 0xdf if payload[0] == first => Ok(Encoding::Msgpack),
        other => Err(ProtocolError::UnknownEncoding(other)),
    }
}

/// Decodes `payload` in the given encoding.
pub fn decode<'a, T: Deserialize<'a>>(
    payload: &'a [u8],
    encoding: Encoding,
) -> Result<T, ProtocolError> {
    match encoding {
        Encoding::Json => serde_json::from_slice(payload).map_err(|e| ProtocolError::Malformed {
            encoding: "JSON",
            message: e.to_string(),
        }),
        Encoding::Msgpack => {
            let malformed = |message: String| ProtocolError::Malformed {
                encoding: "MessagePack",
                message,
            };
            let mut rd: &[u8] = payload;
            let mut de = rmp_serde::Deserializer::new(&mut rd);
            let value = T::deserialize(&mut de).map_err(|e| malformed(e.to_string()))?;
            drop(de);
            // As JSON does: one value, nothing after it.
            let rest = rd.len();
            if rest > 0 {
                return Err(malformed(format!("{rest} bytes after the end of the map")));
            }
            Ok(value)
        }
    }
}

/// Encodes `value`: JSON, or MessagePack as a map with string keys.
pub fn encode<T: Serialize>(value: &T, encoding: Encoding) -> Vec<u8> {
    let out = match encoding {
        Encoding::Json => serde_json::to_vec(value).map_err(|e| e.to_string()),
        Encoding::Msgpack => rmp_serde::to_vec_named(value).map_err(|e| e.to_string()),
    };
    // Our own types always serialise; an error here is a bug worth a clear trace.
    out.unwrap_or_else(|e| {
        tracing::error!("cannot encode an outgoing message: {e}");
        Vec::new()
    })
}

/// Binary data: MessagePack `bin` on the wire, base64 in JSON.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            use base64::Engine;
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("binary data (MessagePack bin, or a base64 string in JSON)")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes, E> {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map(Bytes)
                    .map_err(|e| E::custom(format!("invalid base64: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// `raw` pixels of a crop.
#[derive(Debug, Clone, Deserialize)]
pub struct RawPixels {
    pub width: u32,
    pub height: u32,
    pub format: RawFormat,
    pub data: Bytes,
}

/// One crop of a request as sent. Whatever is wrong with a crop (a field
/// of the wrong type, bad base64, not exactly one of image/raw/bbox) makes
/// it an item error, never its whole request: the crop is first read as a
/// generic value and only then as its fields ([`Crop::source`] says why it
/// cannot be used). Its `id` is read on its own so that even a broken crop
/// is answered under its id.
#[derive(Debug, Clone)]
pub struct Crop {
    pub id: Option<String>,
    fields: Result<CropFields, String>,
}

#[derive(Debug, Clone, Deserialize)]
struct CropFields {
    #[serde(default)]
    image: Option<Bytes>,
    #[serde(default)]
    raw: Option<RawPixels>,
    #[serde(default)]
    bbox: Option<Vec<f64>>,
}

impl<'de> Deserialize<'de> for Crop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = rmpv::Value::deserialize(d)?;
        let id = match &value {
            rmpv::Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some("id"))
                .and_then(|(_, v)| v.as_str().map(str::to_string)),
            _ => None,
        };
        let fields = rmpv::ext::from_value::<CropFields>(value)
            .map_err(|e| format!("invalid crop: {}", bounded_text(e.to_string())));
        Ok(Self { id, fields })
    }
}

/// Where a crop's pixels come from.
#[derive(Debug, Clone, Copy)]
pub enum CropSource<'a> {
    Image(&'a [u8]),
    Raw(&'a RawPixels),
    Bbox(&'a [f64]),
}

impl Crop {
    pub fn source(&self) -> Result<CropSource<'_>, String> {
        let f = self.fields.as_ref().map_err(Clone::clone)?;
        match (&f.image, &f.raw, &f.bbox) {
            (Some(i), None, None) => Ok(CropSource::Image(&i.0)),
            (None, Some(r), None) => Ok(CropSource::Raw(r)),
            (None, None, Some(b)) => Ok(CropSource::Bbox(b)),
            (None, None, None) => Err("crop has none of image, raw or bbox".into()),
            _ => Err("crop must have exactly one of image, raw or bbox".into()),
        }
    }

    /// Whether the crop refers to the request's frame.
    pub fn has_bbox(&self) -> bool {
        self.fields.as_ref().is_ok_and(|f| f.bbox.is_some())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CropRequest {
    pub request_id: String,
    #[serde(default)]
    pub camera_id: Option<String>,
    #[serde(default)]
    pub frame_id: Option<u64>,
    #[serde(default)]
    pub ts_ms: Option<u64>,
    #[serde(default)]
    pub top_k: Option<u8>,
    #[serde(default)]
    pub frame: Option<Bytes>,
    pub crops: Vec<Crop>,
}

impl CropRequest {
    /// Checks the message-level rules (request_id length, crop count).
    pub fn validate(&self, max_crops: usize) -> Result<(), ProtocolError> {
        if self.request_id.is_empty() || self.request_id.len() > MAX_REQUEST_ID {
            return Err(ProtocolError::RequestId(self.request_id.len()));
        }
        if self.crops.is_empty() || self.crops.len() > max_crops {
            return Err(ProtocolError::CropCount {
                got: self.crops.len(),
                max: max_crops,
            });
        }
        // Echoed strings are bounded so that an answer always fits a packet.
        if let Some(c) = self.camera_id.as_ref().filter(|c| c.len() > MAX_ECHOED_ID) {
            return Err(ProtocolError::EchoedTooLong {
                field: "camera_id".into(),
                len: c.len(),
            });
        }
        for (i, crop) in self.crops.iter().enumerate() {
            if let Some(id) = crop.id.as_ref().filter(|id| id.len() > MAX_ECHOED_ID) {
                return Err(ProtocolError::EchoedTooLong {
                    field: format!("the id of crop {i}"),
                    len: id.len(),
                });
            }
        }
        Ok(())
    }

    /// The crop's id: as sent, or its index.
    pub fn crop_id(&self, index: usize) -> String {
        self.crops[index]
            .id
            .clone()
            .unwrap_or_else(|| index.to_string())
    }
}

/// Reads only `request_id` from a payload that failed to decode, or from
/// the first bytes of one too large to decode: the top-level map is read
/// key by key and reading stops at `request_id`, so whatever is broken or
/// cut off after it does not matter. `None` when it cannot be read or is
/// not a valid request_id.
pub fn peek_request_id(payload: &[u8]) -> Option<String> {
    let enc = detect_encoding(payload).ok()?;
    let mut found = None;
    let seed = RequestIdSeed(&mut found);
    // Reading ends with an error on purpose once the id is found (or at a
    // cut); only `found` matters.
    let _ = match enc {
        Encoding::Json => {
            let mut de = serde_json::Deserializer::from_slice(payload);
            de::DeserializeSeed::deserialize(seed, &mut de).map_err(|_| ())
        }
        Encoding::Msgpack => {
            let mut de = rmp_serde::Deserializer::from_read_ref(payload);
            de::DeserializeSeed::deserialize(seed, &mut de).map_err(|_| ())
        }
    };
    found.filter(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID)
}

/// Visits a map's entries in order and stops at `request_id`.
struct RequestIdSeed<'a>(&'a mut Option<String>);

impl<'de> de::DeserializeSeed<'de> for RequestIdSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RequestIdSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a map with request_id")
    }
    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "request_id" {
                let id: std::borrow::Cow<'de, str> = map.next_value()?;
                *self.0 = Some(id.into_owned());
                return Err(de::Error::custom("found"));
            }
            map.next_value::<de::IgnoredAny>()?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    pub id: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateOut {
    pub label: Arc<str>,
    pub similarity: f32,
    pub ref_id: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierOut {
    pub label: String,
    pub probability: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemDecision {
    Match,
    Unknown,
    Error,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    pub decision: ItemDecision,
    /// Shared with the index: answering clones a pointer, not the text.
    pub label: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub similarity: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub distance: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub candidates: Option<Vec<CandidateOut>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub classifier: Option<ClassifierOut>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

impl Item {
    /// An error item; the text is cut to [`MAX_ERROR_TEXT`].
    pub fn error(id: String, error: String) -> Self {
        Self {
            id,
            decision: ItemDecision::Error,
            label: None,
            similarity: None,
            distance: None,
            candidates: None,
            classifier: None,
            error: Some(bounded_text(error)),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimingUs {
    pub queue: u64,
    pub decode: u64,
    pub infer: u64,
    pub search: u64,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecognitionResult {
    pub request_id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub camera_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub frame_id: Option<u64>,
    pub device_id: String,
    pub model: ModelRef,
    pub refdb_version: u64,
    pub items: Vec<Item>,
    pub timing_us: TimingUs,
    pub batch_size: u32,
    pub ts_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReport {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub request_id: Option<String>,
    pub reason: String,
    pub ts_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefDbState {
    pub version: u64,
    pub digest: String,
    pub refs: u64,
    pub labels: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    Online,
    Offline,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: AgentState,
    pub device_id: String,
    pub fleet: String,
    pub boot_id: String,
    pub agent_version: String,
    pub model: ModelRef,
    pub execution_provider: String,
    pub refdb: RefDbState,
    pub started_ms: u64,
    pub ts_ms: u64,
    /// Set when the reference DB could not be opened at start-up and was
    /// moved aside (`refdb.on_corrupt = "reset"`); an addition to v1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refdb_reset: Option<RefDbReset>,
}

/// Why and where the broken reference DB went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefDbReset {
    pub reason: String,
    pub moved_to: String,
    pub ts_ms: u64,
}

/// The Last Will: `{state: "offline", device_id, boot_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Will {
    pub state: AgentState,
    pub device_id: String,
    pub boot_id: String,
}

/// What the agent reads back from its own status topic.
#[derive(Debug, Clone, Deserialize)]
pub struct StatusPeek {
    pub state: AgentState,
    #[serde(default)]
    pub boot_id: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
    pub max: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageLatencies {
    pub total: Percentiles,
    pub queue: Percentiles,
    pub decode: Percentiles,
    pub infer: Percentiles,
    pub search: Percentiles,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub device_id: String,
    pub ts_ms: u64,
    pub interval_ms: u64,
    pub requests: u64,
    pub crops: u64,
    pub errors: u64,
    pub dropped: u64,
    pub queue_depth: u64,
    pub batches: u64,
    pub mean_batch: f64,
    pub throughput_cps: f64,
    pub latency_us: StageLatencies,
}

/// `{key_id, sig, body}`: a signed reference-DB update. `sig` is the
/// Ed25519 signature of exactly the bytes of `body`, a MessagePack
/// [`RefUpdate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedUpdate {
    pub key_id: String,
    pub sig: Bytes,
    pub body: Bytes,
}

/// A versioned change to the reference DB (the `body` of a SignedUpdate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefUpdate {
    pub update_id: String,
    pub fleet: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// `None` (nil on the wire): apply unconditionally.
    #[serde(default)]
    pub base_version: Option<u64>,
    pub version: u64,
    pub issued_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    pub ops: Vec<UpdateOp>,
}

/// One operation of a RefUpdate, named by its `op` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum UpdateOp {
    /// Exactly one of `image` (embedded by the agent) or `embedding` (with
    /// the `model_fingerprint` that computed it).
    Upsert {
        ref_id: String,
        label: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<Bytes>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        embedding: Option<Vec<f32>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model_fingerprint: Option<String>,
    },
    Delete {
        ref_id: String,
    },
    DeleteLabel {
        label: String,
    },
    Clear,
}

/// How an update was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateStatus {
    Applied,
    Duplicate,
    Rejected,
    Expired,
    Stale,
    Gap,
}

impl UpdateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Stale => "stale",
            Self::Gap => "gap",
        }
    }
}

/// `{update_id, status, reason?, version, digest, refs, labels}`: the DB
/// after handling an update. `update_id` is null when it could not be read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateAck {
    pub update_id: Option<String>,
    pub status: UpdateStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub version: u64,
    pub digest: String,
    pub refs: u64,
    pub labels: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_detected_from_the_first_byte() {
        assert_eq!(detect_encoding(b"{\"a\":1}").unwrap(), Encoding::Json);
        assert_eq!(
            detect_encoding(&[0x81, 0xa1, b'a', 1]).unwrap(),
            Encoding::Msgpack
        );
        assert_eq!(detect_encoding(&[0xde, 0, 1]).unwrap(), Encoding::Msgpack);
        assert!(matches!(
            detect_encoding(&[0x92, 1, 2]),
            Err(ProtocolError::UnknownEncoding(0x92))
        ));
        assert_eq!(detect_encoding(b""), Err(ProtocolError::Empty));
    }

    #[test]
    fn binary_fields_are_bin_in_msgpack_and_base64_in_json() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct T {
            data: Bytes,
        }
        let t = T {
            data: Bytes(vec![1, 2, 255]),
        };
        let json = encode(&t, Encoding::Json);
        assert_eq!(std::str::from_utf8(&json).unwrap(), r#"{"data":"AQL/"}"#);
        let mp = encode(&t, Encoding::Msgpack);
        assert_eq!(mp[0], 0x81, "a map, not an array");
        assert!(mp.windows(2).any(|w| w == [0xc4, 3]), "bin 8 of 3 bytes");
        assert_eq!(decode::<T>(&json, Encoding::Json).unwrap(), t);
        assert_eq!(decode::<T>(&mp, Encoding::Msgpack).unwrap(), t);
    }

    #[test]
    fn requests_decode_with_defaults_and_check_their_shape() {
        let req: CropRequest = decode(
            br#"{"request_id":"r1","crops":[{"image":"AAEC"},{"bbox":[1,2,3,4],"id":"b"}],"extra":true}"#,
            Encoding::Json,
        )
        .unwrap();
        req.validate(4).unwrap();
        assert_eq!(req.crop_id(0), "0");
        assert_eq!(req.crop_id(1), "b");
        assert!(matches!(req.crops[1].source(), Ok(CropSource::Bbox(_))));
        assert!(req.validate(1).is_err());
        let wrong_type = decode::<CropRequest>(
            br#"{"request_id":"r","crops":[],"top_k":"x"}"#,
            Encoding::Json,
        );
        assert!(wrong_type.is_err());
        assert_eq!(
            peek_request_id(br#"{"request_id":"r9","crops":7}"#).as_deref(),
            Some("r9")
        );
    }

    #[test]
    fn request_id_is_read_from_broken_or_cut_off_payloads_in_both_encodings() {
        let json = br#"{"camera_id":"c","request_id":"r-json","crops":[{"image":"AAEC"}]}"#;
        assert_eq!(peek_request_id(&json[..40]).as_deref(), Some("r-json"));
        let broken = br#"{"request_id":"r-bad","crops":[{"image":!!!"#;
        assert_eq!(peek_request_id(broken).as_deref(), Some("r-bad"));
        #[derive(Serialize)]
        struct Req<'a> {
            request_id: &'a str,
            #[serde(with = "serde_bytes")]
            frame: Vec<u8>,
        }
        let mp = encode(
            &Req {
                request_id: "r-mp",
                frame: vec![7; 5000],
            },
            Encoding::Msgpack,
        );
        assert_eq!(peek_request_id(&mp[..64]).as_deref(), Some("r-mp"));
        let mut garbage = mp.clone();
        garbage.truncate(30);
        garbage.extend_from_slice(&[0xc1; 8]); // 0xc1 is never valid
        assert_eq!(peek_request_id(&garbage).as_deref(), Some("r-mp"));
        // An id after the cut, too long, or of the wrong type is not read.
        assert_eq!(peek_request_id(&json[..20]), None);
        let long = format!(r#"{{"request_id":"{}"}}"#, "x".repeat(MAX_REQUEST_ID + 1));
        assert_eq!(peek_request_id(long.as_bytes()), None);
        assert_eq!(peek_request_id(br#"{"request_id":7}"#), None);
        assert_eq!(peek_request_id(b"[1,2]"), None);
    }

    #[test]
    fn one_bad_crop_fails_alone_in_either_encoding_and_keeps_its_id() {
        let json = br#"{"request_id":"r","crops":[{"id":"ok","image":"AAEC"},{"id":"b64","image":"not base64!"},{"id":"num","image":7},{"raw":{"width":"x"}}]}"#;
        let req: CropRequest = decode(json, Encoding::Json).expect("the envelope is fine");
        assert!(req.crops[0].source().is_ok());
        let e = req.crops[1].source().unwrap_err();
        assert!(e.contains("base64"), "{e}");
        assert_eq!(req.crop_id(1), "b64");
        assert!(req.crops[2].source().is_err());
        assert_eq!(req.crop_id(2), "num");
        assert!(req.crops[3].source().is_err());
        assert_eq!(req.crop_id(3), "3");
        #[derive(Serialize)]
        struct Mp<'a> {
            request_id: &'a str,
            crops: Vec<rmpv::Value>,
        }
        let mp = encode(
            &Mp {
                request_id: "r",
                crops: vec![
                    rmpv::Value::Map(vec![
                        ("id".into(), "s".into()),
                        ("image".into(), "bad base64 in a str!".into()),
                    ]),
                    rmpv::Value::Map(vec![("image".into(), rmpv::Value::Binary(vec![1, 2]))]),
                    rmpv::Value::from(5),
                ],
            },
            Encoding::Msgpack,
        );
        let req: CropRequest = decode(&mp, Encoding::Msgpack).expect("the envelope is fine");
        assert!(req.crops[0].source().unwrap_err().contains("base64"));
        assert_eq!(req.crop_id(0), "s");
        assert!(matches!(
            req.crops[1].source(),
            Ok(CropSource::Image(&[1, 2]))
        ));
        assert!(req.crops[2].source().is_err());
    }

    #[test]
    fn trailing_bytes_are_refused_in_both_encodings() {
        let json = br#"{"request_id":"r","crops":[]} x"#;
        assert!(decode::<CropRequest>(json, Encoding::Json).is_err());
        #[derive(Serialize, Deserialize, Debug)]
        struct T {
            a: u8,
        }
        let mut mp = encode(&T { a: 1 }, Encoding::Msgpack);
        assert!(decode::<T>(&mp, Encoding::Msgpack).is_ok());
        mp.extend_from_slice(&[0xc0, 0xc0]);
        let e = decode::<T>(&mp, Encoding::Msgpack).unwrap_err().to_string();
        assert!(e.contains("2 bytes after"), "{e}");
    }

    #[test]
    fn echoed_ids_and_error_texts_are_bounded() {
        let long = "x".repeat(MAX_ECHOED_ID + 1);
        let req = |camera: &str, crop: &str| -> CropRequest {
            let text = format!(
                r#"{{"request_id":"r","camera_id":"{camera}","crops":[{{"id":"a","image":"AA=="}},{{"id":"{crop}","image":"AA=="}}]}}"#
            );
            decode(text.as_bytes(), Encoding::Json).unwrap()
        };
        assert!(req("cam", "b").validate(4).is_ok());
        let e = req(&long, "b").validate(4).unwrap_err().to_string();
        assert!(e.contains("camera_id") && e.contains("257"), "{e}");
        let e = req("cam", &long).validate(4).unwrap_err().to_string();
        assert!(e.contains("crop 1"), "{e}");
        let text = bounded_text("é".repeat(1_000_000));
        assert!(text.len() <= MAX_ERROR_TEXT, "{}", text.len());
        assert!(text.ends_with("more bytes cut)"));
        assert_eq!(bounded_text("short".into()), "short");
        let item = Item::error("0".into(), "y".repeat(10_000_000));
        assert!(item.error.unwrap().len() <= MAX_ERROR_TEXT);
    }

    #[test]
    fn json_numbers_read_back_as_the_exact_float_written() {
        // Found by tests/properties.rs: serde_json's default float parser
        // may land one ulp off; `float_roundtrip` makes it exact.
        for v in [1.0301150158894161e210_f64, 2.386581604806736e277] {
            let text = format!(r#"{{"request_id":"r","crops":[{{"bbox":[{v:?},0,1,1]}}]}}"#);
            let req: CropRequest = decode(text.as_bytes(), Encoding::Json).unwrap();
            match req.crops[0].source() {
                Ok(CropSource::Bbox(b)) => assert_eq!(b[0].to_bits(), v.to_bits(), "{v:?}"),
                other => panic!("{other:?}"),
            }
            let back: f64 = decode(&encode(&v, Encoding::Json), Encoding::Json).unwrap();
            assert_eq!(back.to_bits(), v.to_bits(), "{v:?}");
        }
    }

    #[test]
    fn error_items_omit_scores_and_carry_a_null_label() {
        let item = Item::error("3".into(), "bad".into());
        let v: serde_json::Value = serde_json::from_slice(&encode(&item, Encoding::Json)).unwrap();
        assert_eq!(v["decision"], "error");
        assert!(v["label"].is_null());
        assert!(v.get("similarity").is_none());
        assert_eq!(v["error"], "bad");
    }
}
