#!/usr/bin/env bash
# The README's test command (and CI's): installs what the tests need
# (ONNX Runtime from PyPI, Mosquitto from Debian), checks formatting, and
# runs every test against real ONNX Runtime, sled and brokers.
# (scripts/lint.sh adds clippy; it is kept out of here to keep CI short.)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
ensure_onnxruntime
ensure_mosquitto
cargo fmt --all -- --check
# fault-injection: the supervision tests wedge and crash parts of the agent
# (src/fault.rs); release builds and packages never have it.
cargo test --features fault-injection
# The fuzz targets (fuzz/, nightly Rust) must keep building; running them is
# ./scripts/fuzz.sh run TARGET.
./scripts/fuzz.sh check
