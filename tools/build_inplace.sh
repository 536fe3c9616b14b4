#!/usr/bin/env bash
# Build the native module into python/emafuse/ without installing it, for work in a git worktree
# that shares a virtual environment with others:  tools/build_inplace.sh && PYTHONPATH=python pytest
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --features python,pyo3/extension-module --lib
cp target/release/libemafuse.so python/emafuse/_native.abi3.so
