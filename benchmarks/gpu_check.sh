#!/usr/bin/env bash
# One call on the lent GPU machine (Python 3.12, torch 2.11.0+cu130, no Rust, no network):
# install the abi3 wheel built here, run the CUDA tests, run the GPU benchmark.
#
# Here (dev machine):   tools/build_wheel.sh          # writes .gpu/emafuse-*.whl (ignored by git)
# Device tool:          run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/emafuse-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --force-reinstall .gpu/emafuse-*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
cd tests
python3 -m pytest -q -x test_cuda_gpu.py test_cuda_sources.py -k "not rust_rule" 2>&1 | tee "$OUT/tests.log"
status=${PIPESTATUS[0]}
cd ..
python3 benchmarks/bench_gpu.py --output "$OUT/RESULTS_gpu.md" 2>&1 | tee "$OUT/bench.log"
exit "$status"
