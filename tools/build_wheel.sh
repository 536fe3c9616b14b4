#!/usr/bin/env bash
# Build the abi3 wheel (CPython >= 3.10) into .gpu/, with the pure-Python benchmark peers for
# CPython 3.12, for the GPU machine (benchmarks/gpu_check.sh), which has torch 2.11.0+cu130 but no
# Rust and no network. emafuse runs only on the torch release it was compiled against, so this
# runs in an environment with torch 2.11.0 (./dev.sh suite 2.11 makes .venvs/torch-2.11):
#   . .venvs/torch-2.11/bin/activate && tools/build_wheel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_TORCH=2.11.0
found=$(python -c 'import torch; print(torch.__version__.split("+")[0])')
if [ "$found" != "$GPU_TORCH" ]; then
    echo "the GPU machine has torch $GPU_TORCH; this environment has torch $found: activate one with $GPU_TORCH" >&2
    exit 1
fi
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/peers
# Through the build backend, which compiles against this torch and puts the build record in the wheel.
python -c 'import sys; sys.path.insert(0, "build_support"); import backend; backend.build_wheel(".gpu", {"build-args": "--compatibility linux"})'
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/peers pytorch-optimizer==4.1.0 ema-pytorch==0.8.3 torch-ema==0.3 heavyball==3.2.1 opt-einsum bitsandbytes==0.50.2
ls -l .gpu .gpu/peers
