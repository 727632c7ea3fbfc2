#!/usr/bin/env bash
# The cargo-fuzz targets in fuzz/ (what each drives and checks: fuzz/src/lib.rs).
#   scripts/fuzz.sh check                 type-check the fuzz crate, all targets (CI;
#                                         needs only the nightly toolchain)
#   scripts/fuzz.sh build                 build every target with sanitizers (cargo-fuzz)
#   scripts/fuzz.sh run TARGET [SECONDS]  fuzz TARGET (default 600 s) from its corpus;
#                                         a crash lands in fuzz/artifacts/TARGET/
#   scripts/fuzz.sh cmin TARGET           minimise TARGET's corpus in place
#   scripts/fuzz.sh seeds                 rewrite the seed files (fuzz/src/seeds.rs)
#   scripts/fuzz.sh list                  the targets
# Installs the nightly toolchain (rustup) and cargo-fuzz when missing. A
# crash found becomes a regression test in the normal suite
# (tests/fuzz_regressions.rs) before it is fixed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
MANIFEST=fuzz/Cargo.toml

# Longest input libFuzzer tries, per target: room for a request with a few
# small images, a signed update with a few ops, a small encoded image.
max_len() {
    case "$1" in
        crop_request) echo 8192 ;;
        signed_update) echo 4096 ;;
        image_path) echo 16384 ;;
        *) echo "unknown target $1 (see: $0 list)" >&2; return 1 ;;
    esac
}

ensure_nightly() {
    if ! rustup toolchain list | grep -q '^nightly'; then
        echo "==> installing the nightly toolchain (rustup, minimal profile)" >&2
        rustup toolchain install nightly --profile minimal
    fi
}

ensure_cargo_fuzz() {
    ensure_nightly
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        echo "==> installing cargo-fuzz" >&2
        cargo install cargo-fuzz --locked
    fi
}

case "${1:-}" in
    check)
        ensure_nightly
        cargo +nightly check --manifest-path "$MANIFEST" --all-targets --locked
        ;;
    build)
        ensure_cargo_fuzz
        cargo +nightly fuzz build -O
        ;;
    run)
        target="${2:?usage: $0 run TARGET [SECONDS]}"
        seconds="${3:-600}"
        len="$(max_len "$target")"
        ensure_cargo_fuzz
        cargo +nightly fuzz run "$target" -O -- \
            -max_total_time="$seconds" -rss_limit_mb=2048 -max_len="$len" -print_final_stats=1
        ;;
    cmin)
        target="${2:?usage: $0 cmin TARGET}"
        len="$(max_len "$target")"
        ensure_cargo_fuzz
        cargo +nightly fuzz cmin "$target" -O -- -max_len="$len" -rss_limit_mb=2048
        ;;
    seeds)
        ensure_nightly
        cargo +nightly run --manifest-path "$MANIFEST" --example gen_corpus --locked
        ;;
    list)
        echo crop_request
        echo signed_update
        echo image_path
        ;;
    *)
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
