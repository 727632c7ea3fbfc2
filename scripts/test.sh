#!/usr/bin/env bash
# The README's test command (and CI's): installs what the tests need
# (ONNX Runtime from PyPI, Mosquitto from Debian), then checks formatting,
# lints, and runs every test against real ONNX Runtime, sled and brokers.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
ensure_onnxruntime
ensure_mosquitto
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test
