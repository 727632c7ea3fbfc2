//! cargo-fuzz target: see retail_agent_fuzz::image_path for what it drives and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| retail_agent_fuzz::image_path::run(data));
