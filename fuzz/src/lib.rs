//! The harnesses behind retail-agent's cargo-fuzz targets, and the seed
//! corpus they start from.
//!
//! Each target in `fuzz_targets/` is one call into a module here, so the
//! seed generator (`examples/gen_corpus.rs`) and the targets agree on how an
//! input is framed. Every harness drives the library as the daemon does and
//! checks what must hold for any input (bounded answers, clipped boxes,
//! round trips); a broken invariant panics, which libFuzzer reports as a
//! crash.
//!
//! - [`crop_request`]: a CropRequest payload, decoded in both encodings;
//! - [`signed_update`]: a SignedUpdate through the update rules, as raw
//!   envelope bytes or with a body signed by the harness's fixed key;
//! - [`image_path`]: decode with limits, raw buffers, bbox clip and resize.

pub mod crop_request;
pub mod image_path;
pub mod seeds;
pub mod signed_update;
