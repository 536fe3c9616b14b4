#!/usr/bin/env bash
# Build the native module into python/emafuse/ without installing it, for work in a git worktree
# that shares a virtual environment with others:  tools/build_inplace.sh && PYTHONPATH=python pytest
# It builds against the torch of the active environment (build_support/torch_build.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python build_support/torch_build.py -- bash -c '
    cargo build --release --features python,pyo3/extension-module --lib &&
    cp "$CARGO_TARGET_DIR/release/libemafuse.so" python/emafuse/_native.abi3.so'
