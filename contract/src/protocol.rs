//! The MQTT contract's payloads (`shared/spec/PROTOCOL.md`, v1): their
//! types, the encoding detection, and JSON/MessagePack (de)serialisation.
//!
//! Binary fields are MessagePack `bin` or, in JSON, standard base64 strings;
//! [`Bytes`] (owned) and [`Binary`] (borrowed from a MessagePack payload,
//! for crops) read both and write whichever the target format calls for.
//! Owns no I/O and no behaviour beyond checking a message's shape.

use std::borrow::Cow;
use std::sync::Arc;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

pub use crate::text::{bounded_text, excerpt, MAX_ERROR_TEXT};

/// Longest `request_id`, in bytes.
pub const MAX_REQUEST_ID: usize = 128;
/// Largest `top_k` honoured; larger values are clamped.
pub const MAX_TOP_K: usize = 20;
/// Longest `camera_id` or crop `id` echoed in a result, in bytes.
pub const MAX_ECHOED_ID: usize = 256;

/// How a payload is encoded (detected from its first byte; see [`detect_encoding`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Msgpack,
    Json,
}

/// Layouts of uncompressed pixel buffers the contract accepts. Read from
/// a plain string (by hand: generic value deserializers, which crops go
/// through, do not all take a string for a unit variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RawFormat {
    Rgb8,
    Bgr8,
    Rgba8,
    Gray8,
}

impl<'de> serde::Deserialize<'de> for RawFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        [Self::Rgb8, Self::Bgr8, Self::Rgba8, Self::Gray8]
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "raw format `{}` is not one of rgb8, bgr8, rgba8, gray8",
                    crate::text::bounded_text(name.into_owned())
                ))
            })
    }
}

impl RawFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Rgb8 => "rgb8",
            Self::Bgr8 => "bgr8",
            Self::Rgba8 => "rgba8",
            Self::Gray8 => "gray8",
        }
    }

    pub fn bytes_per_pixel(self) -> usize {
        match self {
            Self::Rgb8 | Self::Bgr8 => 3,
            Self::Rgba8 => 4,
            Self::Gray8 => 1,
        }
    }
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

/// Decodes `payload` in the given encoding. Binary fields of types that
/// borrow ([`Binary`]) point into `payload` when it is MessagePack.
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
            // The first value's extent bounds what the (borrowing) reader
            // sees; as JSON does, nothing may follow it. A payload cut
            // short is left to the reader, which says where it ends.
            let extent = msgpack_value_len(payload);
            let value_bytes = extent.map_or(payload, |len| &payload[..len]);
            let mut de = rmp_serde::Deserializer::from_read_ref(value_bytes);
            let value = T::deserialize(&mut de).map_err(|e| malformed(e.to_string()))?;
            match extent {
                Some(len) if len < payload.len() => Err(malformed(format!(
                    "{} bytes after the end of the map",
                    payload.len() - len
                ))),
                Some(_) => Ok(value),
                None => Err(malformed("the payload ends inside a value".into())),
            }
        }
    }
}

/// Length in bytes of the MessagePack value at the start of `bytes`, found
/// by walking its markers (bin, str and ext contents are skipped, not read);
/// `None` if `bytes` ends before the value does or holds a reserved marker.
/// Iterative, so nesting costs no stack.
fn msgpack_value_len(bytes: &[u8]) -> Option<usize> {
    fn be(bytes: &[u8], at: usize, n: usize) -> Option<u64> {
        let b = bytes.get(at..at.checked_add(n)?)?;
        Some(b.iter().fold(0u64, |acc, &x| acc << 8 | u64::from(x)))
    }
    let mut pos = 0usize;
    // Values still to walk; maps count two per entry.
    let mut pending: u64 = 1;
    while pending > 0 {
        pending -= 1;
        let marker = *bytes.get(pos)?;
        pos += 1;
        // (bytes of a length or value that follow, bytes of content or
        // None when those bytes are the length, values it contains)
        let (skip, children): (u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xca | 0xce | 0xd2 => (4, 0),
            0xcb | 0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            // bin 8/16/32 and str 8/16/32: a length, then that many bytes.
            0xc4 | 0xd9 => (1 + be(bytes, pos, 1)?, 0),
            0xc5 | 0xda => (2 + be(bytes, pos, 2)?, 0),
            0xc6 | 0xdb => (4 + be(bytes, pos, 4)?, 0),
            // ext 8/16/32: a length, a type byte, then the data.
            0xc7 => (2 + be(bytes, pos, 1)?, 0),
            0xc8 => (3 + be(bytes, pos, 2)?, 0),
            0xc9 => (5 + be(bytes, pos, 4)?, 0),
            0xdc => (2, be(bytes, pos, 2)?),
            0xdd => (4, be(bytes, pos, 4)?),
            0xde => (2, 2 * be(bytes, pos, 2)?),
            0xdf => (4, 2 * be(bytes, pos, 4)?),
            // 0xc1 is never used.
            0xc1 => return None,
        };
        pos = pos.checked_add(usize::try_from(skip).ok()?)?;
        if pos > bytes.len() {
            return None;
        }
        pending = pending.checked_add(children)?;
    }
    Some(pos)
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

/// Binary data: MessagePack `bin` on the wire, base64 in JSON. Owned; for
/// what the agent writes and for updates it keeps. See [`Binary`] for the
/// borrowing form crops are read as.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Binary(Cow::Borrowed(&self.0)).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Binary::deserialize(d).map(|b| Bytes(b.0.into_owned()))
    }
}

/// Binary data as read: borrowed from the payload where the format allows
/// (MessagePack `bin`, read by [`decode`]), owned where it must be decoded
/// (base64 in JSON). A crop's image or pixels are thus never copied before
/// they are decoded.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Binary<'a>(pub Cow<'a, [u8]>);

impl Binary<'_> {
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Binary<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Binary({} bytes)", self.0.len())
    }
}

impl Serialize for Binary<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            use base64::Engine;
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Binary<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Binary<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("binary data (MessagePack bin, or a base64 string in JSON)")
            }
            fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Binary<'de>, E> {
                Ok(Binary(Cow::Borrowed(v)))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Binary<'de>, E> {
                Ok(Binary(Cow::Owned(v.to_vec())))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Binary<'de>, E> {
                Ok(Binary(Cow::Owned(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Binary<'de>, E> {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map(|b| Binary(Cow::Owned(b)))
                    .map_err(|e| E::custom(format!("invalid base64: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// `raw` pixels of a crop.
#[derive(Debug, Clone, Deserialize)]
pub struct RawPixels<'a> {
    pub width: u32,
    pub height: u32,
    pub format: RawFormat,
    #[serde(borrow)]
    pub data: Binary<'a>,
}

/// One crop of a request as sent. Whatever is wrong with a crop (a field
/// of the wrong type, bad base64, not exactly one of image/raw/bbox) makes
/// it an item error, never its whole request: the crop is first read as a
/// generic value and only then as its fields ([`Crop::source`] says why it
/// cannot be used). Its `id` is read on its own so that even a broken crop
/// is answered under its id. In MessagePack that generic value borrows
/// from the payload, so binary fields are not copied.
#[derive(Debug, Clone)]
pub struct Crop<'a> {
    pub id: Option<String>,
    fields: Result<CropFields<'a>, String>,
}

#[derive(Debug, Clone, Deserialize)]
struct CropFields<'a> {
    #[serde(default, borrow)]
    image: Option<Binary<'a>>,
    #[serde(default, borrow)]
    raw: Option<RawPixels<'a>>,
    #[serde(default)]
    bbox: Option<Vec<f64>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Crop<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let invalid =
            |e: rmpv::ext::Error| format!("invalid crop: {}", bounded_text(e.to_string()));
        if d.is_human_readable() {
            // JSON: strings may hold escapes and binary is base64, so
            // nothing could be borrowed anyway.
            let value = rmpv::Value::deserialize(d)?;
            let id = match &value {
                rmpv::Value::Map(entries) => entries
                    .iter()
                    .find(|(k, _)| k.as_str() == Some("id"))
                    .and_then(|(_, v)| v.as_str().map(str::to_string)),
                _ => None,
            };
            let fields = rmpv::ext::deserialize_from::<CropFields<'a>, _>(value).map_err(invalid);
            Ok(Self { id, fields })
        } else {
            let value = rmpv::ValueRef::<'de>::deserialize(d)?;
            let text = |v: &rmpv::ValueRef<'_>| match v {
                rmpv::ValueRef::String(s) => s.as_str().map(str::to_string),
                _ => None,
            };
            let id = match &value {
                rmpv::ValueRef::Map(entries) => entries
                    .iter()
                    .find(|(k, _)| text(k).as_deref() == Some("id"))
                    .and_then(|(_, v)| text(v)),
                _ => None,
            };
            let fields = rmpv::ext::deserialize_from::<CropFields<'a>, _>(value).map_err(invalid);
            Ok(Self { id, fields })
        }
    }
}

/// Where a crop's pixels come from.
#[derive(Debug, Clone, Copy)]
pub enum CropSource<'r> {
    Image(&'r [u8]),
    Raw(&'r RawPixels<'r>),
    Bbox(&'r [f64]),
}

impl Crop<'_> {
    pub fn source(&self) -> Result<CropSource<'_>, String> {
        let f = self.fields.as_ref().map_err(Clone::clone)?;
        match (&f.image, &f.raw, &f.bbox) {
            (Some(i), None, None) => Ok(CropSource::Image(i.as_slice())),
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

/// A crop request as read, borrowing its binary fields from the payload
/// (see [`Binary`]).
#[derive(Debug, Clone, Deserialize)]
pub struct CropRequest<'a> {
    pub request_id: String,
    #[serde(default)]
    pub camera_id: Option<String>,
    #[serde(default)]
    pub frame_id: Option<u64>,
    #[serde(default)]
    pub ts_ms: Option<u64>,
    #[serde(default)]
    pub top_k: Option<u8>,
    #[serde(default, borrow)]
    pub frame: Option<Binary<'a>>,
    #[serde(borrow)]
    pub crops: Vec<Crop<'a>>,
}

impl CropRequest<'_> {
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

impl ErrorReport {
    /// A report about `request_id` stamped now, its reason cut to
    /// [`MAX_ERROR_TEXT`].
    pub fn now(request_id: Option<String>, reason: String) -> Self {
        Self {
            request_id,
            reason: bounded_text(reason),
            ts_ms: crate::clock::now_ms(),
        }
    }
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
    fn messagepack_crops_and_frame_point_into_the_payload_and_json_ones_are_decoded() {
        #[derive(Serialize)]
        struct Raw<'a> {
            width: u32,
            height: u32,
            format: &'a str,
            data: Bytes,
        }
        #[derive(Serialize)]
        struct Crop<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            image: Option<Bytes>,
            #[serde(skip_serializing_if = "Option::is_none")]
            raw: Option<Raw<'a>>,
        }
        #[derive(Serialize)]
        struct Req<'a> {
            request_id: &'a str,
            frame: Bytes,
            crops: Vec<Crop<'a>>,
        }
        let sent = Req {
            request_id: "r",
            frame: Bytes(vec![9; 300]),
            crops: vec![
                Crop {
                    image: Some(Bytes(vec![1; 70_000])),
                    raw: None,
                },
                Crop {
                    image: None,
                    raw: Some(Raw {
                        width: 2,
                        height: 1,
                        format: "rgb8",
                        data: Bytes(vec![4, 5, 6, 7, 8, 9]),
                    }),
                },
            ],
        };
        let mp = encode(&sent, Encoding::Msgpack);
        let within = mp.as_ptr_range();
        let req: CropRequest = decode(&mp, Encoding::Msgpack).unwrap();
        let frame = req.frame.as_ref().unwrap();
        assert!(matches!(frame.0, Cow::Borrowed(_)));
        assert!(within.contains(&frame.as_slice().as_ptr()));
        match req.crops[0].source() {
            Ok(CropSource::Image(b)) => {
                assert_eq!(b.len(), 70_000);
                assert!(within.contains(&b.as_ptr()), "the image was copied");
            }
            other => panic!("{other:?}"),
        }
        match req.crops[1].source() {
            Ok(CropSource::Raw(r)) => {
                assert_eq!(r.data.as_slice(), [4, 5, 6, 7, 8, 9]);
                assert!(within.contains(&r.data.as_slice().as_ptr()));
            }
            other => panic!("{other:?}"),
        }
        // JSON carries base64, decoded into bytes of its own.
        let json = encode(&sent, Encoding::Json);
        let req: CropRequest = decode(&json, Encoding::Json).unwrap();
        assert!(matches!(req.frame.as_ref().unwrap().0, Cow::Owned(_)));
        assert!(matches!(req.crops[0].source(), Ok(CropSource::Image(b)) if b == [1; 70_000]));
    }

    #[test]
    fn the_extent_of_any_messagepack_value_is_found_and_a_cut_one_is_refused() {
        use rmpv::Value;
        let nested = Value::Map(vec![
            ("nil".into(), Value::Nil),
            ("t".into(), Value::Boolean(true)),
            (
                "ints".into(),
                Value::Array(
                    [
                        0i64,
                        -1,
                        127,
                        128,
                        -33,
                        255,
                        256,
                        65_536,
                        -129,
                        -40_000,
                        i64::MIN,
                        1 << 40,
                    ]
                    .iter()
                    .map(|&i| Value::from(i))
                    .chain([Value::from(u64::MAX)])
                    .collect(),
                ),
            ),
            (
                "floats".into(),
                Value::Array(vec![Value::F32(1.5), Value::F64(-2.25)]),
            ),
            ("str".into(), Value::from("é".repeat(20))),
            ("str16".into(), Value::from("s".repeat(300))),
            ("str32".into(), Value::from("s".repeat(70_000))),
            ("bin".into(), Value::Binary(vec![0xc1; 10])),
            ("bin16".into(), Value::Binary(vec![0xc1; 300])),
            ("bin32".into(), Value::Binary(vec![0xc1; 70_000])),
            ("arr16".into(), Value::Array(vec![Value::Nil; 20])),
            (
                "map16".into(),
                Value::Map((0..20).map(|i| (Value::from(i), Value::Nil)).collect()),
            ),
            (
                "ext".into(),
                Value::Array(
                    [1usize, 2, 4, 8, 16, 3, 300, 70_000]
                        .iter()
                        .map(|&n| Value::Ext(5, vec![0xc1; n]))
                        .collect(),
                ),
            ),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &nested).unwrap();
        assert_eq!(msgpack_value_len(&bytes), Some(bytes.len()));
        // Every cut ends inside the value.
        for cut in [0, 1, 10, bytes.len() / 2, bytes.len() - 1] {
            assert_eq!(msgpack_value_len(&bytes[..cut]), None, "cut at {cut}");
        }
        // A declared length past the end is refused without walking it.
        assert_eq!(msgpack_value_len(&[0xdf, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(msgpack_value_len(&[0xc6, 0xff, 0xff, 0xff, 0xff, 0]), None);
        assert_eq!(msgpack_value_len(&[0xc1]), None);
        // A request cut short is malformed, with the reader's own words.
        let mut req = Vec::new();
        let map = Value::Map(vec![
            ("request_id".into(), "r".into()),
            (
                "crops".into(),
                Value::Array(vec![Value::Map(vec![(
                    "image".into(),
                    Value::Binary(vec![1; 50]),
                )])]),
            ),
        ]);
        rmpv::encode::write_value(&mut req, &map).unwrap();
        assert!(decode::<CropRequest>(&req, Encoding::Msgpack).is_ok());
        let e = decode::<CropRequest>(&req[..req.len() - 5], Encoding::Msgpack).unwrap_err();
        assert!(
            matches!(
                e,
                ProtocolError::Malformed {
                    encoding: "MessagePack",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn echoed_ids_and_error_texts_are_bounded() {
        let long = "x".repeat(MAX_ECHOED_ID + 1);
        let validate = |camera: &str, crop: &str| {
            let text = format!(
                r#"{{"request_id":"r","camera_id":"{camera}","crops":[{{"id":"a","image":"AA=="}},{{"id":"{crop}","image":"AA=="}}]}}"#
            );
            decode::<CropRequest>(text.as_bytes(), Encoding::Json)
                .unwrap()
                .validate(4)
        };
        assert!(validate("cam", "b").is_ok());
        let e = validate(&long, "b").unwrap_err().to_string();
        assert!(e.contains("camera_id") && e.contains("257"), "{e}");
        let e = validate("cam", &long).unwrap_err().to_string();
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
