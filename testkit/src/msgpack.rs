//! MessagePack values built by hand with `rmpv`, as a client written from
//! the contract would build its payloads: maps with string keys, and their
//! encoding. Which fields a payload holds (requests, crops, signed updates)
//! is left to the helpers and tests that build one; decoding answers is
//! left to `tests/common` (`to_json`).

use rmpv::Value;

/// A MessagePack map with string keys, in the order given.
pub fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    )
}

/// The MessagePack encoding of `v`.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}
