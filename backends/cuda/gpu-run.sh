#!/usr/bin/env bash
# The CUDA backend's GPU batch: tests (NVRTC kernel, fallback PTX, eager arenas), the tests
# under compute-sanitizer memcheck, clears on allocation, the `migrate` example, the backend-generic
# scenario suites of the root crate (when packed), the copy and fault-latency benches. Logs: $OUT;
# a short table is printed at the end.
#
# Here (no GPU needed), from the repository root:
#   ../shared/tools/gpu-pack test -p drm-pagemap-cuda
#   ../shared/tools/gpu-pack bench -p drm-pagemap-cuda
#   ../shared/tools/gpu-pack example migrate
#   ../shared/tools/gpu-pack test -p drm-pagemap --test scenarios --test engine_faults --test stress
#   ../shared/tools/gpu-pack example svm-multi-device          (step svm-pointers)
#   ../shared/tools/gpu-pack test -p drm-pagemap-uffd --test cuda_pointer   (step cuda-pointer:
#     pointer ranges on CUDA, the managed-memory baseline and the pointer stress)
# On the GPU machine, from the repository root:  OUT=/some/dir backends/cuda/gpu-run.sh
# The plots of BENCHMARKS.md: STEPS=plots (also packs `example svm-multi-device`) runs the copy
# bench, the fault-latency bench, `svm_multi_device latency` and the main job at each page
# size with their results files written to $OUT/results.tgz; here, unpack it into
# docs/plots/data/<machine>/ and run `cargo run -p drm-pagemap-plots -- docs/plots/data/<machine>`.
# Steps run in priority order, each under its own time limit, so a cut-off run still leaves
# the logs of what finished.
set -u
OUT=${OUT:-/tmp/cuda-gpu-run}
L=$OUT/logs
mkdir -p "$L"
B=.gpu/bin
rows=()
step() {
    local name=$1 limit=$2
    shift 2
    want "$name" || return 0
    local t0=$SECONDS
    timeout "$limit" "$@" >"$L/$name.log" 2>&1
    local rc=$?
    rows+=("$(printf '%-16s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
    printf '== %-16s rc=%s %ss\n' "$name" "$rc" "$((SECONDS - t0))"
}
have() { [ -x "$B/$1" ]; }
# STEPS=tests,memcheck,... runs only those steps (default: all).
want() {
    [ -z "${STEPS:-}" ] || [[ ",$STEPS," == *",$1,"* ]] ||
        { [[ "$1" == plots-* ]] && [[ ",$STEPS," == *",plots,"* ]]; }
}

nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv >"$L/gpu.txt" 2>&1
cat "$L/gpu.txt"
command -v compute-sanitizer >/dev/null || export PATH=$PATH:/usr/local/cuda/bin

step tests 45 "$B/test-gpu" --include-ignored
step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 50 \
    "$B/test-gpu" --include-ignored --skip device_fault_fails_the_fence_with_its_curesult
step tests-lib 20 "$B/test-lib-drm_pagemap_cuda" --include-ignored
have test-ring && step ring 60 "$B/test-ring" --include-ignored --nocapture
have test-ring && step ring-ptx 60 env DRM_PAGEMAP_CUDA_KERNEL=ptx "$B/test-ring" --include-ignored --nocapture
have test-ring && step ring-memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
    --print-limit 50 "$B/test-ring" --include-ignored
if have migrate; then
    step example 30 bash -c "
        set -x
        $B/migrate --backend cuda; echo \"exit \$?\"
        $B/migrate --backend auto --page-size 65536; echo \"exit \$?\"
        $B/migrate --backend cuda --page-size 2097152; echo \"exit \$?\"
        $B/migrate --backend cuda --coalesce consecutive; echo \"exit \$?\"
        $B/migrate --backend cuda --layout 's*1000,1*500,.,2*7,s1s2s' --to 0; echo \"exit \$?\"
        $B/migrate --backend cuda --fail-copy 2; echo \"exit \$? (1 expected: failed, data verified)\"
        $B/migrate --backend cuda --pointers; echo \"exit \$?\"
        $B/migrate --backend cuda --pointers --page-size 2097152; echo \"exit \$?\"
    "
fi
have svm_multi_device && step svm-pointers 60 "$B/svm_multi_device" --backend cuda --pointers
have test-cuda_pointer && step cuda-pointer 120 "$B/test-cuda_pointer" --include-ignored --test-threads 1 --nocapture
have bench-cuda_copy && step bench 140 env DRM_PAGEMAP_CUDA_BENCH=${DRM_PAGEMAP_CUDA_BENCH:-} "$B/bench-cuda_copy" --bench
for t in engine_faults scenarios back_to_ram; do
    have "test-$t" && step "$t" 60 "$B/test-$t"
done
have test-stress && step stress 120 "$B/test-stress" on_the_gpu --nocapture
step tests-ptx 20 env DRM_PAGEMAP_CUDA_KERNEL=ptx "$B/test-gpu" --include-ignored
step tests-eager 40 env DRM_PAGEMAP_CUDA_VMM=0 "$B/test-gpu" --include-ignored
step tests-clear-on-alloc 40 env DRM_PAGEMAP_CUDA_CLEAR_ON_FREE=0 "$B/test-gpu" --include-ignored
have bench-fault_latency && step latency 60 "$B/bench-fault_latency" --iters 300
# Results files for the plots (not part of a default run: STEPS=plots asks for it).
if [[ ",${STEPS:-}," == *",plots,"* ]]; then
    R=$OUT/results
    mkdir -p "$R"
    tail -n +2 "$L/gpu.txt" | head -1 | cut -d, -f1,2 >"$R/machine.txt"
    have bench-cuda_copy && step plots-copy 200 env DRM_PAGEMAP_BENCH_JSON="$R/cuda_copy.jsonl" \
        DRM_PAGEMAP_CUDA_BENCH=transfers "$B/bench-cuda_copy" --bench
    have bench-fault_latency && step plots-latency 90 "$B/bench-fault_latency" --iters 500 \
        --json "$R/fault_latency.jsonl"
    for r in 1 2 3; do
        have svm_multi_device && step "plots-svm-$r" 120 bash -c \
            "$B/svm_multi_device latency --iters 1000 | tee $R/svm-latency-cuda-run$r.txt"
        if have migrate; then
            for ps in 4096 65536 2097152; do
                step "plots-main-$ps-$r" 60 bash -c \
                    "$B/migrate --backend cuda --page-size $ps | tee $R/migrate-cuda-$ps-$r.txt"
            done
        fi
    done
    tar -C "$OUT" -czf "$OUT/results.tgz" results && rm -rf "$R"
fi

{
    echo "== summary"
    cat "$L/gpu.txt"
    printf '%s\n' "${rows[@]}"
    for f in tests tests-ptx tests-eager tests-lib ring ring-ptx ring-memcheck scenarios engine_faults back_to_ram stress; do
        [ -f "$L/$f.log" ] && echo "$f: $(grep -E '^test result' "$L/$f.log" | tail -1)"
    done
    grep -h -E 'kernel: forced|device fault reported|device 0:|stall ' "$L/tests.log" 2>/dev/null
    grep -h -E '^test .*FAILED|panicked' "$L"/tests*.log 2>/dev/null | head -20
    grep -H 'ERROR SUMMARY' "$L/memcheck.log" "$L/ring-memcheck.log" 2>/dev/null
    grep -h -E '^exit|^\+ \.gpu|migration failed|^copy calls' "$L/example.log" 2>/dev/null
    grep -h -E '^(== drm|TARGET|note)' "$L/bench.log" 2>/dev/null
} | tee "$L/summary.txt"
# At most 8 files come back: the summary, the bench log, and everything else in one archive.
cp "$L/summary.txt" "$OUT/summary.txt"
[ -f "$L/bench.log" ] && cp "$L/bench.log" "$OUT/bench.log"
tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$L"
