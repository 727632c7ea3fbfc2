//! cargo-fuzz target: see retail_agent_fuzz::signed_update for what it drives and checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| retail_agent_fuzz::signed_update::run(data));
