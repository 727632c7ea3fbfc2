//! Everything between encoded bytes and the model's input tensor.
//!
//! [`decode`] turns encoded images and raw pixel buffers into RGB, within the
//! configured limits; [`preprocess`] cuts, resizes and normalises them into a
//! slot of the batch tensor, exactly as the model's manifest says. Nothing
//! here knows about ONNX Runtime, MQTT or the reference DB.

pub mod decode;
pub mod preprocess;

pub use decode::{CropRect, DecodeLimits, RawFormat, VisionError};
pub use preprocess::Preprocessor;
