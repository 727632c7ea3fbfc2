# Sourced by the other scripts: finds or installs what retail-agent needs on
# a fresh Debian/Ubuntu machine with Rust and Python.
#   ensure_onnxruntime  - ONNX Runtime's libonnxruntime.so from the PyPI wheel
#                         (in ./.venv) unless ORT_DYLIB_PATH already names one
#   ensure_mosquitto    - the Mosquitto broker (Debian package) for the tests
#   ensure_zigbuild T   - cargo-zigbuild and zig (PyPI, into ./.venv unless on
#                         PATH already) and the Rust target T, for builds
#                         against an old glibc (scripts/package.sh)
#   ensure_qemu_arm64   - qemu-aarch64-static and arm64 glibc/libstdc++
#                         (Debian's cross packages) to run arm64 binaries

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ORT_WHEEL_VERSION="${ORT_WHEEL_VERSION:-1.32.0}"
# Known to work together (scripts/package.sh, cargo 1.95).
ZIGLANG_VERSION="${ZIGLANG_VERSION:-0.17.1}"
CARGO_ZIGBUILD_VERSION="${CARGO_ZIGBUILD_VERSION:-0.24.1}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@"
}

ensure_venv() {
    if [ -x "$ROOT/.venv/bin/pip" ]; then
        return 0
    fi
    if ! python3 -m venv "$ROOT/.venv" >/dev/null 2>&1; then
        apt_install python3-venv
        python3 -m venv "$ROOT/.venv"
    fi
}

find_venv_ort() {
    local f
    for f in "$ROOT"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*; do
        if [ -f "$f" ]; then
            echo "$f"
            return 0
        fi
    done
}

ensure_onnxruntime() {
    if [ -n "${ORT_DYLIB_PATH:-}" ] && [ -f "$ORT_DYLIB_PATH" ]; then
        return 0
    fi
    local lib
    lib="$(find_venv_ort)"
    if [ -z "$lib" ]; then
        echo "==> installing ONNX Runtime $ORT_WHEEL_VERSION (PyPI wheel) into .venv" >&2
        ensure_venv
        "$ROOT/.venv/bin/pip" install -q --disable-pip-version-check "onnxruntime==$ORT_WHEEL_VERSION"
        lib="$(find_venv_ort)"
    fi
    if [ -z "$lib" ]; then
        echo "error: could not install ONNX Runtime; set ORT_DYLIB_PATH to a libonnxruntime.so (>= 1.17)" >&2
        return 1
    fi
    export ORT_DYLIB_PATH="$lib"
    echo "==> ONNX Runtime: $ORT_DYLIB_PATH" >&2
}

ensure_mosquitto() {
    if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
        return 0
    fi
    echo "==> installing mosquitto (Debian package)" >&2
    apt_install mosquitto
    # The tests start their own brokers; the packaged service is not needed.
}

ensure_zigbuild() {
    local target="$1"
    # Where zig and cargo-zigbuild go: ./.venv, or RETAIL_AGENT_TOOLS_VENV
    # (CI's arm64 step keeps them beside its cached target directory: the
    # tools' path reaches the build's fingerprints, so a venv in each fresh
    # clone would make cargo rebuild every dependency).
    local venv="${RETAIL_AGENT_TOOLS_VENV:-$ROOT/.venv}"
    if [ -x "$venv/bin/cargo-zigbuild" ]; then
        export PATH="$venv/bin:$PATH"
    fi
    if ! command -v cargo-zigbuild >/dev/null 2>&1 \
        || ! { command -v zig >/dev/null 2>&1 || python3 -m ziglang version >/dev/null 2>&1; }; then
        echo "==> installing zig $ZIGLANG_VERSION and cargo-zigbuild $CARGO_ZIGBUILD_VERSION (PyPI) into $venv" >&2
        if [ ! -x "$venv/bin/pip" ] && ! python3 -m venv "$venv" >/dev/null 2>&1; then
            apt_install python3-venv
            python3 -m venv "$venv"
        fi
        "$venv/bin/pip" install -q --disable-pip-version-check \
            "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
        # cargo-zigbuild runs zig through `python3 -m ziglang`: the venv's.
        export PATH="$venv/bin:$PATH"
    fi
    if ! rustup target list --installed | grep -qx "$target"; then
        rustup target add "$target" >/dev/null
    fi
}

ensure_qemu_arm64() {
    if command -v qemu-aarch64-static >/dev/null 2>&1 \
        && [ -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ] \
        && [ -e /usr/aarch64-linux-gnu/lib/libstdc++.so.6 ]; then
        return 0
    fi
    echo "==> installing qemu-user-static and arm64 glibc/libstdc++ (Debian packages)" >&2
    apt_install qemu-user-static libc6-arm64-cross libstdc++6-arm64-cross
}

# Prints the path of an aarch64 libonnxruntime.so, taken from PyPI's
# onnxruntime wheel for manylinux aarch64 (a CPU build: enough to run the
# arm64 binary under qemu-user). Downloaded once, then kept in
# ~/.cache/retail-agent (pip's own cache also keeps the wheel).
onnxruntime_arm64() {
    local cache="${XDG_CACHE_HOME:-$HOME/.cache}/retail-agent/onnxruntime-$ORT_WHEEL_VERSION-aarch64"
    local lib="$cache/libonnxruntime.so.$ORT_WHEEL_VERSION"
    if [ ! -f "$lib" ]; then
        echo "==> downloading ONNX Runtime $ORT_WHEEL_VERSION for aarch64 (PyPI wheel)" >&2
        rm -rf "$cache"
        mkdir -p "$cache/wheel"
        python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
            --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp \
            -d "$cache/wheel" "onnxruntime==$ORT_WHEEL_VERSION" >&2
        python3 - "$cache" "$ORT_WHEEL_VERSION" <<'PY'
import glob, shutil, sys, zipfile
cache, version = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(f"{cache}/wheel/*.whl")
name = f"libonnxruntime.so.{version}"
with zipfile.ZipFile(wheel) as z, z.open(f"onnxruntime/capi/{name}") as src:
    with open(f"{cache}/{name}.part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
        mv "$lib.part" "$lib"
        rm -rf "$cache/wheel"
    fi
    echo "$lib"
}
