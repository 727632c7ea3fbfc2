#!/usr/bin/env bash
# The README's test command (and CI's): installs what the tests need
# (ONNX Runtime from PyPI, Mosquitto from Debian), checks formatting, runs
# every test against real ONNX Runtime, sled and brokers, then the arm64
# step (scripts/ci-arm64.sh: the Jetson's Debian package, built and checked
# under qemu-user; RETAIL_AGENT_SKIP_ARM64=1 skips it).
# (scripts/lint.sh adds clippy; it is kept out of here to keep CI short.)
#
#   ./scripts/test.sh        the full tier (CI's): everything below
#   ./scripts/test.sh fast   the developers' tier, a few minutes once
#                            built: every test but the floods, bursts,
#                            partition and outage tests of
#                            tests/reliability.rs, the bench smoke test
#                            (tests/bench_cli.rs) and the 50-agent and
#                            SIGKILL fleet tests; no fuzz check, no arm64
#                            step
set -euo pipefail
TIER="${1:-full}"
case "$TIER" in
    full | fast) ;;
    *)
        echo "usage: $0 [full|fast]" >&2
        exit 2
        ;;
esac
source "$(dirname "$0")/env.sh"
cd "$ROOT"
ensure_onnxruntime
ensure_mosquitto
cargo fmt --all -- --check
# fault-injection: the supervision tests wedge and crash parts of the agent
# (src/fault.rs); release builds and packages never have it.
# The workspace's other members: the contract and the tests' own helpers.
cargo test -p retail-contract -p retail-testkit
if [ "$TIER" = fast ]; then
    cargo test --features fault-injection --lib --bins \
        --test config_cli --test daemon_inprocess --test daemon_mosquitto \
        --test fleet --test fuzz_regressions --test monitoring \
        --test preprocess_fixtures --test properties --test recognition_cli \
        --test refdb --test reliability --test secure_bus --test supervision \
        -- --skip fifty_agent_processes --skip sigkill_in_a_stream \
        --skip flood --skip burst --skip partition --skip outage
    echo "==> fast tier passed; ./scripts/test.sh runs the full one (CI's)" >&2
    exit 0
fi
cargo test --features fault-injection
# The fuzz targets (fuzz/, nightly Rust) must keep building; running them is
# ./scripts/fuzz.sh run TARGET.
./scripts/fuzz.sh check
if [ "${RETAIL_AGENT_SKIP_ARM64:-}" = 1 ]; then
    echo "==> RETAIL_AGENT_SKIP_ARM64=1: skipping the arm64 package step" >&2
else
    ./scripts/ci-arm64.sh
fi
