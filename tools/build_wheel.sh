#!/usr/bin/env bash
# Build the abi3 wheel (CPython >= 3.10, linked against torch 2.11's libtorch) into .gpu/, for the
# GPU machine (benchmarks/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu
python -m maturin build --release --compatibility linux --out .gpu
ls -l .gpu
