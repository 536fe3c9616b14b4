#!/usr/bin/env bash
# One call on the lent GPU machine (Python 3.12, torch 2.11.0+cu130, no Rust, no network):
# install the abi3 wheel built here, run the CUDA tests and the GPU benchmarks.
#
# Here (dev machine):   tools/build_wheel.sh          # writes .gpu/ (ignored by git)
# Device tool:          run(command="bash benchmarks/gpu_check.sh [parts]", carry=[".gpu"])
# parts (default: all but hessian): tests optim research ema lean hessian. Output also goes to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/emafuse-gpu}
PARTS=${*:-tests optim research ema lean}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index --force-reinstall .gpu/emafuse-*.whl || exit 1
python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/peers .gpu/peers/*.whl && export PYTHONPATH=/tmp/peers
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
status=0
for part in $PARTS; do
    case $part in
        tests) (cd tests && python3 -m pytest -q -x test_cuda_gpu.py test_cuda_sources.py test_step_plan.py -k "not rust_rule") 2>&1 | tee "$OUT/tests.log"
               status=${PIPESTATUS[0]} ;;
        optim) python3 benchmarks/bench_gpu.py --output "$OUT/RESULTS_gpu.md" 2>&1 | tee "$OUT/bench_gpu.log" ;;
        research) python3 benchmarks/bench_research.py --device cuda --workloads resnet50,gpt2-small --output "$OUT/RESULTS_research_gpu.md" 2>&1 | tail -40 ;;
        ema) python3 benchmarks/bench_ema.py --device cuda 2>&1 | tee "$OUT/bench_ema_gpu.log" | tail -40 ;;
        lean) python3 benchmarks/bench_lean_state.py --device cuda --workloads resnet50,gpt2-small --output "$OUT/RESULTS_lean_gpu.md" 2>&1 | tail -30 ;;
        hessian) python3 benchmarks/bench_adahessian.py --device cuda --workloads resnet50,gpt2-small --output "$OUT/RESULTS_adahessian_gpu.md" 2>&1 | tail -20 ;;
    esac
done
exit "$status"
