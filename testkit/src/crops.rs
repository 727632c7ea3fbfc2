//! The crops of a MessagePack CropRequest (PROTOCOL.md, "CropRequest") in
//! their plain form: `{image: bin}`, an encoded image as a camera would
//! send it. Raw-pixel crops, boxes into a frame, crop ids and the request
//! around the crops are left to each test, which varies them on purpose.

use rmpv::Value;

/// The crop `{image: <bytes as bin>}` of a MessagePack CropRequest.
pub fn image_crop(bytes: &[u8]) -> Value {
    crate::msgpack::map(vec![("image", Value::Binary(bytes.to_vec()))])
}
