#!/usr/bin/env bash
# Reliability checks beyond `cargo test --workspace` (which already runs the model-based
# property test, the concurrency stress test and the bad-input suite at their CI sizes):
#   1. loom model tests of the fences and of the page-reference protocol;
#   2. the fuzz drivers' corpus replay on stable (always);
#   3. bounded cargo-fuzz runs of both fuzz targets (nightly + cargo-fuzz, installed here
#      when missing and installable);
#   4. Miri on the unit tests of the core and of drm-pagemap-testkit (nightly + the miri
#      component, installed here when missing and installable);
#   5. with DRM_PAGEMAP_LONG=1: the long model and stress runs, longer fuzzing, every Miri test.
# Whatever the toolchain cannot do is skipped with a line saying "SKIP: <what>: <why>".
# A failing check makes the script exit non-zero after every check ran.
#
# Knobs: DRM_PAGEMAP_LONG=1, FUZZ_SECS (per target; default 20, long 600).
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

LONG=0
case "${DRM_PAGEMAP_LONG:-0}" in 0 | "") ;; *) LONG=1 ;; esac
if [ "$LONG" = 1 ]; then FUZZ_SECS=${FUZZ_SECS:-600}; else FUZZ_SECS=${FUZZ_SECS:-20}; fi

failed=()
step() { printf '\n--- reliability: %s\n' "$*"; }
skip() { printf 'SKIP: %s\n' "$*"; }
check() { # check <name> <command...>: runs it, records a failure
    local name=$1
    shift
    local t0=$SECONDS
    if "$@"; then
        printf 'ok: %s (%ss)\n' "$name" $((SECONDS - t0))
    else
        printf 'FAIL: %s (%ss)\n' "$name" $((SECONDS - t0))
        failed+=("$name")
    fi
}

# ---------------------------------------------------------------------------------------
step "loom: fences and the page-reference protocol"
# A separate target dir: --cfg loom would otherwise rebuild the main one from scratch.
check "loom" env RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test -p drm-pagemap-core --test loom_fence --release

# ---------------------------------------------------------------------------------------
step "fuzz drivers: seed corpus + pseudo-random inputs on stable"
check "fuzz replay (stable)" cargo test --manifest-path fuzz/Cargo.toml --no-default-features --release

# ---------------------------------------------------------------------------------------
# Nightly: present, or installable once (bounded).
NIGHTLY=0
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    NIGHTLY=1
elif command -v rustup >/dev/null &&
    timeout 300 rustup toolchain install nightly --profile minimal >/dev/null 2>&1; then
    NIGHTLY=1
fi

step "cargo fuzz: ${FUZZ_SECS}s per target"
if [ "$NIGHTLY" = 0 ]; then
    skip "cargo fuzz: no nightly toolchain and none installable here (the stable replay above ran the drivers)"
else
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo "installing cargo-fuzz"
        timeout 600 cargo install --locked cargo-fuzz >/dev/null 2>&1 || true
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        skip "cargo fuzz: cargo-fuzz is not installed and could not be installed (the stable replay above ran the drivers)"
    else
        # Sanitizer off: the code under test has no unsafe; coverage guidance is what matters.
        # New inputs go to a scratch corpus (the seeds stay untouched), crashes to artifacts/.
        scratch=$(mktemp -d)
        artifacts=fuzz/artifacts/ci
        mkdir -p "$artifacts"
        if cargo +nightly fuzz build -O -s none >/dev/null 2>&1 || cargo +nightly fuzz build -O -s none; then
            for t in layout_parse api_sequence; do
                mkdir -p "$scratch/$t"
                check "cargo fuzz $t" cargo +nightly fuzz run -O -s none "$t" "$scratch/$t" "fuzz/seeds/$t" -- \
                    -max_total_time="$FUZZ_SECS" -rss_limit_mb=4096 -timeout=60 \
                    -artifact_prefix="$artifacts/" -print_final_stats=1
            done
            ls "$artifacts" 2>/dev/null | sed 's/^/crash input: fuzz\/artifacts\/ci\//'
        else
            skip "cargo fuzz: the nightly toolchain cannot build the fuzz targets here"
        fi
        rm -rf "$scratch"
    fi
fi

# ---------------------------------------------------------------------------------------
step "miri: the unit tests of the core and the testkit"
if [ "$NIGHTLY" = 0 ]; then
    skip "miri: no nightly toolchain"
else
    if ! cargo +nightly miri --version >/dev/null 2>&1; then
        timeout 300 rustup component add miri rust-src --toolchain nightly >/dev/null 2>&1 || true
    fi
    if ! cargo +nightly miri --version >/dev/null 2>&1; then
        skip "miri: the nightly toolchain has no miri component and it could not be added"
    elif ! timeout 600 cargo +nightly miri setup >/dev/null 2>&1; then
        skip "miri: 'cargo miri setup' failed (no rust-src?)"
    else
        # Tests that fill 2 MiB chunks of atomics (the testkit's arena memory, `mem`) or
        # build large page tables (the core's `table`) take minutes each under Miri on 2
        # cores. CI runs the pure-logic modules (new tests there are picked up by the
        # filters); the long run runs every unit test of both crates.
        if [ "$LONG" = 1 ]; then
            core_filters=()
            kit_filters=()
            what="every unit test"
        else
            core_filters=(page:: plan:: fence:: types:: error:: extent::)
            kit_filters=(layout:: inject:: time::)
            what="unit tests of ${core_filters[*]}"
        fi
        check "miri core ($what)" env CARGO_TARGET_DIR=target/miri \
            timeout 900 cargo +nightly miri test -p drm-pagemap-core --lib -- "${core_filters[@]}"
        [ "$LONG" = 1 ] || what="unit tests of ${kit_filters[*]}"
        check "miri testkit ($what)" env CARGO_TARGET_DIR=target/miri \
            timeout 900 cargo +nightly miri test -p drm-pagemap-testkit --lib -- "${kit_filters[@]}"
    fi
fi

# ---------------------------------------------------------------------------------------
if [ "$LONG" = 1 ]; then
    step "long model and stress runs"
    check "model + stress (long)" env DRM_PAGEMAP_LONG=1 \
        cargo test --release -p drm-pagemap --test model --test stress -- --nocapture
fi

if [ ${#failed[@]} -gt 0 ]; then
    printf '\nreliability: FAILED: %s\n' "${failed[*]}"
    exit 1
fi
printf '\nreliability: all checks passed or were skipped with a reason\n'
