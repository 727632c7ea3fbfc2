# Sourced by the other scripts: finds or installs what retail-agent needs on
# a fresh Debian/Ubuntu machine with Rust and Python.
#   ensure_onnxruntime  - ONNX Runtime's libonnxruntime.so from the PyPI wheel
#                         (in ./.venv) unless ORT_DYLIB_PATH already names one
#   ensure_mosquitto    - the Mosquitto broker (Debian package) for the tests

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ORT_WHEEL_VERSION="${ORT_WHEEL_VERSION:-1.32.0}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@"
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
        if ! python3 -m venv "$ROOT/.venv" >/dev/null 2>&1; then
            apt_install python3-venv
            python3 -m venv "$ROOT/.venv"
        fi
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
