#!/usr/bin/env bash
# A/B on the GPU machine: this build (.gpu/bin) against a baseline build (.gpu/base, the same
# binaries packed from an earlier commit), alternating in one batch so both see the same
# machine. Logs under $OUT; a short table at the end.
#
# Here (no GPU needed), from the repository root:
#   ../shared/tools/gpu-pack example migrate; ../shared/tools/gpu-pack example svm-multi-device
#   ../shared/tools/gpu-pack bench -p drm-pagemap-cuda
#   (the same in a worktree of the baseline commit, then copy its .gpu/bin/* to .gpu/base/)
# On the GPU machine:  OUT=/some/dir ROUNDS=3 PARTS=main,latency,copy backends/cuda/ab-run.sh
# (ORDER="bin base" runs this build first in each round, to rule out an order effect.)
# BASE_ARGS="--no-kept-buffers": the baseline's main-job runs get these arguments too; without
# a .gpu/base the baseline is this build's binaries with them (an A/B of a flag in one build).
#   OUT=/some/dir ROUNDS=7 PARTS=main BASE_ARGS=--no-kept-buffers backends/cuda/ab-run.sh
# RESULTS=1: this build's (.gpu/bin) runs also leave results files for the plots of
# BENCHMARKS.md in $OUT/results.tgz (copy bench JSON lines, fault_latency --json, the latency
# and main-job text); unpack into docs/plots/data/<machine>/ and run
# `cargo run -p drm-pagemap-plots -- docs/plots/data/<machine>`.
set -u
OUT=${OUT:-/tmp/ab-run}
ROUNDS=${ROUNDS:-3}
PARTS=${PARTS:-main,latency}
L=$OUT/ab
R=$OUT/results
mkdir -p "$L"
[ "${RESULTS:-0}" = 1 ] && mkdir -p "$R"
# results FILE: where this build's run of a part keeps its results file (none for the baseline).
res() { [ "${RESULTS:-0}" = 1 ] && [ "$b" = bin ] && echo "$R/$1"; }
want() { [[ ",$PARTS," == *",$1,"* ]]; }
# dir NAME: where NAME's binaries are (the baseline without .gpu/base: this build's).
dir() { if [ "$1" = base ] && [ ! -d .gpu/base ]; then echo bin; else echo "$1"; fi; }
# The baseline's extra main-job arguments (BASE_ARGS, split on spaces).
extra=()
read -r -a extra <<<"${BASE_ARGS:-}"
args() { [ "$1" = base ] && [ ${#extra[@]} -gt 0 ] && printf '%s\n' "${extra[@]}"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$L/gpu.txt" 2>&1
[ "${RESULTS:-0}" = 1 ] && cp "$L/gpu.txt" "$R/machine.txt"
for r in $(seq 1 "$ROUNDS"); do
    for b in ${ORDER:-base bin}; do
        if want main; then
            for ps in 4096 65536 2097152; do
                mapfile -t more < <(args "$b")
                timeout 60 ".gpu/$(dir "$b")/migrate" --backend cuda --page-size "$ps" \
                    "${more[@]}" >"$L/main-$b-$ps-$r.txt" 2>&1
                f=$(res "migrate-cuda-$ps-$r.txt") && cp "$L/main-$b-$ps-$r.txt" "$f"
            done
        fi
        if want latency; then
            timeout 120 ".gpu/$(dir "$b")/svm_multi_device" latency --iters 1000 >"$L/svm-$b-$r.txt" 2>&1
            f=$(res "svm-latency-cuda-run$r.txt") && cp "$L/svm-$b-$r.txt" "$f"
            json=()
            f=$(res "fault_latency-run$r.jsonl") && json=(--json "$f")
            timeout 90 ".gpu/$(dir "$b")/bench-fault_latency" --iters 300 "${json[@]}" >"$L/fl-$b-$r.txt" 2>&1
        fi
        if want copy && [ "$r" = 1 ]; then
            f=$(res cuda_copy.jsonl) || f=
            DRM_PAGEMAP_BENCH_JSON=$f timeout 200 ".gpu/$(dir "$b")/bench-cuda_copy" --bench >"$L/copy-$b.txt" 2>&1
        fi
    done
done
{
    cat "$L/gpu.txt"
    for f in "$L"/main-*.txt; do
        printf '%s: %s | %s\n' "$(basename "$f" .txt)" "$(grep -h '^moved' "$f")" \
            "$(grep -ch 'data verified' "$f")"
    done
    for f in "$L"/svm-*.txt "$L"/fl-*.txt; do
        [ -f "$f" ] && { echo "== $(basename "$f")"; tail -12 "$f"; }
    done
} >"$OUT/ab-summary.txt"
cat "$OUT/ab-summary.txt"
tar -C "$OUT" -czf "$OUT/ab-logs.tgz" ab && rm -rf "$L"
if [ "${RESULTS:-0}" = 1 ]; then tar -C "$OUT" -czf "$OUT/results.tgz" results && rm -rf "$R"; fi
