#!/usr/bin/env bash
# Regenerates pages.ptx (the fallback PTX, loaded when NVRTC is missing) from pages.ll.
# Needs llc with the NVPTX target (Debian: llvm-14). PTX ISA 6.0 / sm_52: every driver since
# CUDA 9 JIT-compiles it for the GPU at hand.
set -euo pipefail
cd "$(dirname "$0")"
llc -O3 -march=nvptx64 -mcpu=sm_52 -mattr=+ptx60 pages.ll -o pages.ptx
echo "wrote $(pwd)/pages.ptx"
