#!/usr/bin/env bash
# Build the abi3 wheel (CPython >= 3.10, linked against torch 2.11's libtorch) into .gpu/, with
# the pure-Python benchmark peers for CPython 3.12, for the GPU machine (benchmarks/gpu_check.sh),
# which has torch but no network.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/peers
python -m maturin build --release --compatibility linux --out .gpu
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/peers pytorch-optimizer==4.1.0 ema-pytorch==0.8.3 torch-ema==0.3 heavyball==3.2.1 opt-einsum
ls -l .gpu .gpu/peers
