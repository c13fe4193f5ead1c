#!/usr/bin/env bash
# The plots that need no GPU, measured on this machine: the main job on the simulated backend
# at each page size and xe-svm's fault latency on it, written as results files into DIR
# (default docs/plots/data/cpu-sim), then drawn into docs/plots/.
#   benches/plots/measure-cpu.sh [DIR]      (ROUNDS=N runs per page size, default 3)
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-docs/plots/data/cpu-sim}
ROUNDS=${ROUNDS:-3}
mkdir -p "$DIR"
cargo build --release --example migrate --example svm-multi-device
X=target/release/examples
printf '%s, %s vCPU, Rust %s (sim backend: the GB/s say nothing about hardware)\n' \
    "$(uname -s) $(uname -m)" "$(nproc)" "$(rustc --version | cut -d' ' -f2)" >"$DIR/machine.txt"
for r in $(seq 1 "$ROUNDS"); do
    for ps in 4096 65536 2097152; do
        "$X/migrate" --backend sim --page-size "$ps" >"$DIR/migrate-sim-$ps-$r.txt"
    done
    "$X/svm-multi-device" latency --backend sim --iters "${ITERS:-300}" >"$DIR/svm-latency-sim-run$r.txt"
done
cargo run -q -p drm-pagemap-plots -- "$DIR"
