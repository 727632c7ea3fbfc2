#!/usr/bin/env bash
# The README's test command (and CI's): installs what the tests need
# (ONNX Runtime from PyPI, Mosquitto from Debian), checks formatting, runs
# every test against real ONNX Runtime, sled and brokers, then the arm64
# step (scripts/ci-arm64.sh: the Jetson's Debian package, built and checked
# under qemu-user; RETAIL_AGENT_SKIP_ARM64=1 skips it).
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
if [ "${RETAIL_AGENT_SKIP_ARM64:-}" = 1 ]; then
    echo "==> RETAIL_AGENT_SKIP_ARM64=1: skipping the arm64 package step" >&2
else
    ./scripts/ci-arm64.sh
fi
