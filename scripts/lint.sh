#!/usr/bin/env bash
# Formatting and lints, as run before every submission.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
