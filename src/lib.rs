//! retail-agent: recognises retail products in camera crops on NVIDIA Jetson
//! (or any Linux box) with an ONNX embedding model and a local reference DB,
//! and serves the result over MQTT.
//!
//! Data flows `bus` (MQTT in) → `pipeline` (queue, batching) → `vision`
//! (decode, crop, resize, normalise) → `engine` (ONNX Runtime) → `refdb`
//! (index, search) → `bus` (results), with `config`, `manifest`, `metrics`
//! and `cli` around it.

// The contract's modules, at the paths the agent has always used.
pub use retail_contract::{clock, protocol, secrets, text};

pub mod bench;
pub mod bus;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataset;
pub mod demo;
pub mod engine;
pub mod engine_cache;
pub mod eval;
pub mod fault;
pub mod fleet;
pub mod health;
pub mod heap;
pub mod log_summary;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod open_set;
pub mod pipeline;
pub mod preflight;
pub mod prometheus;
pub mod recognizer;
pub mod refdb;
pub mod supervisor;
pub mod vision;
pub mod watchdog;
