#!/usr/bin/env bash
# Cross-compiles retail-agent for aarch64 Jetsons (JetPack 5: glibc 2.31)
# with cargo-zigbuild and zig from PyPI, and prints the newest glibc symbol
# version the binary needs. With --smoke it also runs `--version` under
# qemu-user (Debian's qemu-user-static and libc6-arm64-cross).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
TARGET=aarch64-unknown-linux-gnu
if ! command -v cargo-zigbuild >/dev/null 2>&1; then
    python3 -m pip install -q --disable-pip-version-check ziglang cargo-zigbuild
fi
rustup target add "$TARGET" >/dev/null
cargo zigbuild --release --target "$TARGET.2.31" --bin retail-agent
BIN="target/$TARGET/release/retail-agent"
echo "built $BIN"
echo "needs glibc up to: $(objdump -T "$BIN" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)"
if [ "${1:-}" = "--smoke" ]; then
    command -v qemu-aarch64-static >/dev/null 2>&1 || apt_install qemu-user-static libc6-arm64-cross
    qemu-aarch64-static -L /usr/aarch64-linux-gnu "$BIN" --version
fi
