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
set -u
OUT=${OUT:-/tmp/ab-run}
ROUNDS=${ROUNDS:-3}
PARTS=${PARTS:-main,latency}
L=$OUT/ab
mkdir -p "$L"
want() { [[ ",$PARTS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$L/gpu.txt" 2>&1
for r in $(seq 1 "$ROUNDS"); do
    for b in ${ORDER:-base bin}; do
        if want main; then
            for ps in 4096 65536 2097152; do
                timeout 60 ".gpu/$b/migrate" --backend cuda --page-size "$ps" \
                    >"$L/main-$b-$ps-$r.txt" 2>&1
            done
        fi
        if want latency; then
            timeout 120 ".gpu/$b/svm_multi_device" latency --iters 1000 >"$L/svm-$b-$r.txt" 2>&1
            timeout 90 ".gpu/$b/bench-fault_latency" --iters 300 >"$L/fl-$b-$r.txt" 2>&1
        fi
        if want copy && [ "$r" = 1 ]; then
            timeout 200 ".gpu/$b/bench-cuda_copy" --bench >"$L/copy-$b.txt" 2>&1
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
