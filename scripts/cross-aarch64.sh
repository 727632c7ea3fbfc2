#!/usr/bin/env bash
# Cross-compiles retail-agent for aarch64 Jetsons (JetPack 5: glibc 2.31)
# with cargo-zigbuild and zig from PyPI, and prints the newest glibc symbol
# version the binary needs. With --smoke it also runs `--version` under
# qemu-user (Debian's qemu-user-static and libc6-arm64-cross).
# (scripts/package.sh builds the Debian packages the same way.)
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
TARGET=aarch64-unknown-linux-gnu
ensure_zigbuild "$TARGET"
cargo zigbuild --release --target "$TARGET.2.31" --bin retail-agent
BIN="target/$TARGET/release/retail-agent"
echo "built $BIN"
echo "needs glibc up to: $(objdump -T "$BIN" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)"
if [ "${1:-}" = "--smoke" ]; then
    ensure_qemu_arm64
    qemu-aarch64-static -L /usr/aarch64-linux-gnu "$BIN" --version
fi
