#!/usr/bin/env bash
# Builds the Debian packages of retail-agent:
#   target/debian/retail-agent_<version>_amd64.deb
#   target/debian/retail-agent_<version>_arm64.deb
# For each architecture it builds the binary with cargo-zigbuild against
# glibc 2.31 (JetPack 5 / Ubuntu 20.04; zig and cargo-zigbuild from PyPI),
# in the `deb` profile (release without debug info) and without the demo's
# embedded broker (cargo feature demo-broker), fails if
# the binary needs a GLIBC_ symbol newer than 2.31 or a shared library the
# package does not depend on, and assembles the package with dpkg-deb:
#   /usr/bin/retail-agent
#   /lib/systemd/system/retail-agent.service      (systemd/retail-agent.service)
#   /etc/retail-agent/agent.toml, models/*         (conffiles: agent-config/)
#   /usr/share/doc/retail-agent/                   (README, SECURITY, copyright,
#                                                   changelog, mosquitto example)
#   maintainer scripts from packaging/deb/ (postinst, prerm, postrm)
# The version is Cargo.toml's.
#
# Usage: scripts/package.sh [--arch amd64|arm64|all] [--skip-build] [--profile NAME]
#   --arch        which package(s) to build (default: all)
#   --skip-build  package the binaries already built
#                 (target/<triple>/<profile>/retail-agent, or under
#                 $CARGO_TARGET_DIR); still checked
#   --profile     cargo profile (default: deb; CI's arm64 check uses
#                 ci-arm64, which builds faster, see Cargo.toml)
# Environment: DEB_MAINTAINER overrides the Maintainer field.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"

ARCHES=(amd64 arm64)
SKIP_BUILD=0
PROFILE=deb
while [ $# -gt 0 ]; do
    case "$1" in
        --arch)
            case "${2:-}" in
                amd64 | arm64) ARCHES=("$2") ;;
                all) ARCHES=(amd64 arm64) ;;
                *) echo "error: --arch takes amd64, arm64 or all" >&2; exit 2 ;;
            esac
            shift 2
            ;;
        --skip-build) SKIP_BUILD=1; shift ;;
        --profile) PROFILE="${2:?--profile needs a name}"; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

GLIBC_CEILING=2.31
MAINTAINER="${DEB_MAINTAINER:-retail-agent maintainers <retail-agent@localhost>}"
OUT_DIR="$ROOT/target/debian"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
# The profile's output folder (cargo names the dev profile's "debug").
PROFILE_DIR="$PROFILE"
[ "$PROFILE" = dev ] && PROFILE_DIR=debug

# Package metadata from Cargo.toml (cargo's own parser, no build).
META="$(cargo metadata --format-version 1 --no-deps --offline 2>/dev/null || cargo metadata --format-version 1 --no-deps)"
CRATE_VERSION="$(python3 -c '
import json, sys
print([p for p in json.load(sys.stdin)["packages"] if p["name"] == "retail-agent"][0]["version"])' <<<"$META")"
# Debian sorts "~" before anything: 0.2.0-rc.1 becomes 0.2.0~rc.1.
DEB_VERSION="${CRATE_VERSION//-/\~}"
if git rev-parse --git-dir >/dev/null 2>&1; then
    SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}"
    COMMIT="$(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD -- 2>/dev/null || echo '+changes')"
else
    SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(date +%s)}"
    COMMIT="unknown"
fi
# Not exported: only the package's timestamps take it (touch, dpkg-deb
# below). Exported, it would reach the cargo build, where ring's build
# script reruns when it changes: every commit would rebuild ring and all
# that depends on it, defeating CI's cached arm64 target directory.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/retail-agent-deb.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

triple_of() {
    case "$1" in
        amd64) echo x86_64-unknown-linux-gnu ;;
        arm64) echo aarch64-unknown-linux-gnu ;;
    esac
}

elf_machine_of() {
    case "$1" in
        amd64) echo "Advanced Micro Devices X86-64" ;;
        arm64) echo "AArch64" ;;
    esac
}

# The newest GLIBC_x.y version the binary requires (its version needs).
newest_glibc() {
    readelf -W --version-info "$1" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/^GLIBC_//' | sort -uV | tail -n 1
}

# Fails unless the binary is for the architecture, needs glibc <= the
# ceiling, and links only libraries that Depends covers; sets DEPENDS.
check_binary() {
    local arch="$1" bin="$2" machine newest lib
    machine="$(readelf -h "$bin" | sed -n 's/^ *Machine: *//p')"
    if [ "$machine" != "$(elf_machine_of "$arch")" ]; then
        echo "error: $bin is for '$machine', not $arch" >&2
        return 1
    fi
    newest="$(newest_glibc "$bin")"
    echo "==> $arch: $bin needs glibc up to GLIBC_$newest (ceiling $GLIBC_CEILING)"
    if [ "$(printf '%s\n%s\n' "$newest" "$GLIBC_CEILING" | sort -V | tail -n 1)" != "$GLIBC_CEILING" ]; then
        echo "error: $bin needs GLIBC_$newest, newer than $GLIBC_CEILING (JetPack 5); versions over it:" >&2
        local v
        for v in $(readelf -W --version-info "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/^GLIBC_//' | sort -uV); do
            if [ "$(printf '%s\n%s\n' "$v" "$GLIBC_CEILING" | sort -V | tail -n 1)" != "$GLIBC_CEILING" ]; then
                echo "  GLIBC_$v" >&2
            fi
        done
        return 1
    fi
    DEPENDS="libc6 (>= $GLIBC_CEILING)"
    for lib in $(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        case "$lib" in
            libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | ld-linux-*.so.*) ;;
            # libgcc-s1 from Ubuntu 20.04 on, libgcc1 before.
            libgcc_s.so.1) DEPENDS="$DEPENDS, libgcc-s1 | libgcc1" ;;
            *)
                echo "error: $bin links $lib, which the package's Depends does not cover" >&2
                return 1
                ;;
        esac
    done
    DEPENDS="$DEPENDS, adduser"
}

build_binary() {
    local arch="$1" triple
    triple="$(triple_of "$arch")"
    ensure_zigbuild "$triple"
    echo "==> $arch: cargo zigbuild --profile $PROFILE --target $triple.$GLIBC_CEILING (no demo broker)"
    local start=$SECONDS
    cargo zigbuild --locked --profile "$PROFILE" --no-default-features \
        --target "$triple.$GLIBC_CEILING" --bin retail-agent
    echo "==> $arch: built in $((SECONDS - start)) s"
}

# debian/copyright (machine-readable), with the Rust crates linked into the
# binary and their licenses (cargo metadata, this build's features).
write_copyright() {
    local triple="$1" out="$2"
    {
        cat <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: retail-agent
Comment: Built from the retail-agent sources by scripts/package.sh. ONNX
 Runtime is not included: the agent loads the libonnxruntime.so installed
 on the device. The binary statically links these Rust crates (name
 version: license, as each declares it in its Cargo.toml; their copyright
 belongs to their authors):
EOF
        cargo metadata --format-version 1 --locked --no-default-features \
            --filter-platform "$triple" | python3 -c '
import json, sys
m = json.load(sys.stdin)
pkgs = {p["id"]: p for p in m["packages"]}
nodes = {n["id"]: n for n in m["resolve"]["nodes"]}
root = m["resolve"]["root"]
seen, todo = set(), [root]
while todo:
    i = todo.pop()
    for d in nodes[i]["deps"]:
        # Normal (run-time) dependencies only: no build or dev dependencies.
        if any(k["kind"] is None for k in d["dep_kinds"]) and d["pkg"] not in seen:
            seen.add(d["pkg"])
            todo.append(d["pkg"])
for name, version, lic in sorted((pkgs[i]["name"], pkgs[i]["version"], pkgs[i].get("license") or "see its sources") for i in seen):
    print(f" {name} {version}: {lic}")
'
        cat <<'EOF'

Files: *
Copyright: retail-agent contributors
License: Apache-2.0

License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 can
 be found in /usr/share/common-licenses/Apache-2.0.
EOF
    } >"$out"
}

write_changelog() {
    local out="$1"
    cat >"$out" <<EOF
retail-agent ($DEB_VERSION) unstable; urgency=medium

  * Package built by scripts/package.sh from commit $COMMIT.
    What changed: see README.md and the project's history.

 -- $MAINTAINER  $(date -u -R -d "@$SOURCE_DATE_EPOCH")
EOF
}

assemble() {
    local arch="$1" bin="$2" triple root deb size
    triple="$(triple_of "$arch")"
    root="$WORK/$arch"
    rm -rf "$root"
    mkdir -p "$root"
    local doc="$root/usr/share/doc/retail-agent"

    install -D -m 0755 "$bin" "$root/usr/bin/retail-agent"
    install -D -m 0644 systemd/retail-agent.service "$root/lib/systemd/system/retail-agent.service"
    install -D -m 0644 agent-config/agent.toml "$root/etc/retail-agent/agent.toml"
    install -d -m 0755 "$root/etc/retail-agent/models"
    local f
    for f in agent-config/models/*; do
        install -m 0644 "$f" "$root/etc/retail-agent/models/"
    done
    install -D -m 0644 README.md "$doc/README.md"
    install -m 0644 SECURITY.md "$doc/SECURITY.md"
    install -D -m 0644 agent-config/mosquitto/mosquitto.conf "$doc/examples/mosquitto/mosquitto.conf"
    install -m 0644 agent-config/mosquitto/acl "$doc/examples/mosquitto/acl"
    write_copyright "$triple" "$doc/copyright"
    chmod 0644 "$doc/copyright"
    write_changelog "$WORK/changelog.Debian"
    gzip -9n -c "$WORK/changelog.Debian" >"$doc/changelog.Debian.gz"
    chmod 0644 "$doc/changelog.Debian.gz"

    install -d -m 0755 "$root/DEBIAN"
    for f in postinst prerm postrm; do
        install -m 0755 "packaging/deb/$f" "$root/DEBIAN/$f"
    done
    (cd "$root" && find etc -type f | sort | sed 's|^|/|') >"$root/DEBIAN/conffiles"
    size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
    cat >"$root/DEBIAN/control" <<EOF
Package: retail-agent
Version: $DEB_VERSION
Architecture: $arch
Maintainer: $MAINTAINER
Installed-Size: $size
Depends: $DEPENDS
Suggests: mosquitto, mosquitto-clients
Section: net
Priority: optional
Description: retail product recognition over MQTT for NVIDIA Jetson
 retail-agent receives product crops from a checkout camera's detector over
 MQTT, embeds them with an ONNX model (TensorRT or CUDA through ONNX Runtime
 on NVIDIA Jetson, CPU elsewhere), finds the nearest products in a local
 reference DB and publishes the recognitions, its status and metrics.
 .
 ONNX Runtime is not included: install libonnxruntime.so (on Jetson, an
 onnxruntime-gpu build for the JetPack release) and see
 /usr/share/doc/retail-agent/README.md. The service is installed but not
 enabled or started until its configuration is edited.
EOF
    (cd "$root" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' | sort | xargs -d '\n' md5sum) >"$root/DEBIAN/md5sums"
    chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"
    find "$root" -exec touch --no-dereference -d "@$SOURCE_DATE_EPOCH" {} +

    mkdir -p "$OUT_DIR"
    deb="$OUT_DIR/retail-agent_${DEB_VERSION}_${arch}.deb"
    SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
    echo "==> $arch: $deb ($(du -k "$deb" | cut -f1) KiB; installed $size KiB)"
}

for arch in "${ARCHES[@]}"; do
    bin="$TARGET_DIR/$(triple_of "$arch")/$PROFILE_DIR/retail-agent"
    if [ "$SKIP_BUILD" = 0 ]; then
        build_binary "$arch"
    elif [ ! -x "$bin" ]; then
        echo "error: --skip-build, but $bin is not built" >&2
        exit 1
    fi
    check_binary "$arch" "$bin"
    assemble "$arch" "$bin"
done
