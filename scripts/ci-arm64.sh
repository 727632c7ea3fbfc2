#!/usr/bin/env bash
# CI's arm64 step, run at the end of scripts/test.sh: builds the arm64
# Debian package (scripts/package.sh: cargo-zigbuild, glibc <= 2.31, no demo
# broker; cargo profile ci-arm64, which builds faster than the packages'
# `deb` profile) and checks it with scripts/check-package.sh: contents,
# `systemd-analyze verify`, `--version` and `check-config` on the packaged
# default config under qemu-user, and, as root, recognition with the aarch64
# ONNX Runtime from PyPI's wheel and dpkg install/remove/purge.
# In CI (CI=true) the arm64 build keeps its target directory between runs
# in ~/.cache/retail-agent/ci-target (RETAIL_AGENT_CI_TARGET overrides), so
# a run compiles only what changed; zig and cargo-zigbuild (whose path
# reaches cargo's fingerprints) and the ONNX Runtime download are kept
# beside it.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
start=$SECONDS
if [ "${CI:-}" = true ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
    export CARGO_TARGET_DIR="${RETAIL_AGENT_CI_TARGET:-${XDG_CACHE_HOME:-$HOME/.cache}/retail-agent/ci-target}"
    # Keep the cache bounded: retail-agent's own artifacts are never reused
    # by another clone (their hash includes the clone's path), and a cache
    # grown past 4 GiB by dependency upgrades starts over.
    if [ -d "$CARGO_TARGET_DIR" ]; then
        find "$CARGO_TARGET_DIR" -mindepth 3 -maxdepth 4 \( -name 'retail-agent-*' -o -name 'retail_agent-*' \
            -o -name 'libretail_agent-*' \) -prune -exec rm -rf {} +
        if [ "$(du -sm "$CARGO_TARGET_DIR" | cut -f1)" -gt 4096 ]; then
            rm -rf "$CARGO_TARGET_DIR"
        fi
    fi
    export RETAIL_AGENT_TOOLS_VENV="${RETAIL_AGENT_TOOLS_VENV:-$(dirname "$CARGO_TARGET_DIR")/tools-venv}"
    echo "==> arm64 build cache: $CARGO_TARGET_DIR (zig and cargo-zigbuild: $RETAIL_AGENT_TOOLS_VENV)"
fi
./scripts/package.sh --arch arm64 --profile ci-arm64
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
deb="target/debian/retail-agent_${version//-/\~}_arm64.deb"

args=()
if [ "$(id -u)" = 0 ]; then
    ensure_qemu_arm64
    args+=(--onnxruntime "$(onnxruntime_arm64)")
    if dpkg-query -W -f='${db:Status-Status}' retail-agent 2>/dev/null | grep -qv '^not-installed$' \
        || [ -e /etc/retail-agent ] || [ -e /var/lib/retail-agent ]; then
        echo "==> NOT testing install/remove/purge: retail-agent is installed here (or its directories exist)" >&2
    else
        args+=(--lifecycle)
    fi
else
    echo "==> NOT testing recognition under qemu or install/remove/purge: they need root" >&2
fi
./scripts/check-package.sh "${args[@]}" "$deb"
echo "==> arm64 step: $((SECONDS - start)) s"
