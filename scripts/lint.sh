#!/usr/bin/env bash
# Formatting and lints, as run before every submission: clippy over every
# target with the test-only fault injection on, and without the default
# features (the Debian packages' build, no embedded demo broker).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet --features retail-agent/fault-injection -- -D warnings
cargo clippy --all-targets --quiet --no-default-features -- -D warnings
