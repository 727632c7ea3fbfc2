#!/usr/bin/env bash
# The README's main command: installs ONNX Runtime if needed, builds the
# agent and runs its self-contained demo (in-process broker, bundled model,
# synthetic products). Extra arguments go to `retail-agent demo`.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
ensure_onnxruntime
cargo run --release --quiet -- demo "$@"
