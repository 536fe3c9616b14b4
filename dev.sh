#!/usr/bin/env bash
# emafuse's two commands on a fresh machine (Rust, Python 3.11 and pip are all it assumes):
#   ./dev.sh demo        set everything up, then train a small model with emafuse.AdamW beside torch's
#   ./dev.sh test        set everything up, then run the lints and the whole test suite (Rust and
#                        Python) against the newest supported torch, and the Python suite against
#                        the oldest (built unoptimised beside the newest, and run beside the lints)
#   ./dev.sh suite M     set everything up for torch M (e.g. 2.13), then run the Python suite
#   ./dev.sh lint        set everything up, then run the lints only
#   ./dev.sh bench       set everything up, then run the CPU benchmarks (writes benchmarks/RESULTS.md)
# The supported torch releases are the files requirements/torch-M.txt (torch, and the torchvision
# built for it). Setup for release M makes a virtual environment in .venvs/torch-M (EMAFUSE_VENV
# overrides it), installs that torch and the test dependencies of requirements/test.txt, and builds
# emafuse from source against that torch and installs it. demo, lint and bench use the newest
# release unless EMAFUSE_TORCH=M names another.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
RELEASES=$(ls requirements/torch-*.txt | sed 's|requirements/torch-\(.*\)\.txt|\1|' | sort -V)
OLDEST=$(echo "$RELEASES" | head -n 1)
NEWEST=$(echo "$RELEASES" | tail -n 1)

venv_of() {
    echo "${EMAFUSE_VENV:-.venvs/torch-$1}"
}

# The environment for release M: its virtual environment, with that torch and the test dependencies.
install() {
    local release=$1
    if [ ! -f "requirements/torch-$release.txt" ]; then
        echo "torch $release is not supported; supported: $(echo $RELEASES)" >&2
        exit 2
    fi
    if [ ! -x "$(venv_of "$release")/bin/python" ]; then
        "$PY" -m venv "$(venv_of "$release")"
    fi
    "$(venv_of "$release")/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "requirements/torch-$release.txt" -r requirements/test.txt
}

# Build emafuse against release M's torch and install it there (build_support/torch_build.py finds
# that torch; maturin is already installed, so pip need not make an isolated build environment).
# Further arguments go to maturin (cargo), e.g. `build M --profile quick`.
build() {
    local args=()
    if [ $# -gt 1 ]; then
        args=(--config-settings "build-args=${*:2}")
    fi
    "$(venv_of "$1")/bin/python" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps "${args[@]}" .
}

# Install and build for release M, then activate its environment.
setup() {
    install "$1"
    build "$1"
    # shellcheck disable=SC1091
    . "$(venv_of "$1")/bin/activate"
}

# Wait for background job $1; if it failed, show its log $2 and fail.
finish() {
    if ! wait "$1"; then
        echo "failed: $2" >&2
        cat "$2" >&2
        exit 1
    fi
}

# Formatting and lints (part of `test`): rustfmt, clippy (warnings are errors), ruff, and the
# native module's type stubs against the built module.
lint() {
    cargo fmt --check
    python build_support/torch_build.py -- \
        cargo clippy --release --quiet --features python,pyo3/extension-module --all-targets -- -D warnings
    python -m ruff check --quiet .
    python -m mypy.stubtest emafuse._native
}

case "${1:-}" in
    demo)
        setup "${EMAFUSE_TORCH:-$NEWEST}"
        python examples/demo.py
        ;;
    test)
        # Two releases on a machine with few cores, scheduled so that the cores stay busy: the
        # Rust unit tests (no torch needed) compile while pip installs both releases (each pip
        # mostly one process at a time, as is each build), the two builds run side by side, and
        # the oldest release's suite runs beside the lints and the newest release's suite.
        mkdir -p target
        trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a failure stops the background jobs too
        # (--lib: the library's unit tests only; there are no doctests, and building the library
        # once more as a cdylib for them would take a core from the release builds)
        cargo test --profile unit --quiet --lib > target/cargo-test.log 2>&1 &
        unit=$!
        (EMAFUSE_VENV='' install "$OLDEST") > target/install-oldest.log 2>&1 &
        oldest=$!
        install "$NEWEST"
        finish $oldest target/install-oldest.log
        # The oldest release's module is built unoptimised (Cargo.toml's profile `quick`: the same
        # bits, slower kernels): its suite checks what depends on the torch release, the newest
        # release's suite the optimised build users get. Measured on 2 cores: the emafuse crate
        # takes 20 minutes (34 CPU-minutes) to build optimised, under 5 (7) unoptimised.
        (EMAFUSE_VENV='' build "$OLDEST" --profile quick) > target/build-oldest.log 2>&1 &
        oldest=$!
        build "$NEWEST"
        finish $oldest target/build-oldest.log
        finish $unit target/cargo-test.log
        grep "test result" target/cargo-test.log
        # The two suites share the cores: torch's OpenMP workers spin while they wait for work, so
        # two suites with a worker per core each oversubscribe them (measured on 2 cores: the
        # suites took 570 s side by side with OpenMP's default, 311 s with one worker each). The
        # engine's own thread pool keeps its default, so the suites still run it multi-threaded.
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        # The NVRTC compile of every CUDA kernel variant (the longest test, about 170 s per
        # architecture; its source does not depend on the torch release) runs once, for sm_80 in
        # the oldest release's suite and for sm_90 in the newest's, so that both suites end about
        # together (measured: the oldest's, unoptimised, takes 510 s without it; the lints and the
        # newest's about as long).
        nvrtc=tests/test_cuda_sources.py::test_every_kernel_compiles_with_nvrtc
        # shellcheck disable=SC1091
        (EMAFUSE_VENV='' && . "$(venv_of "$OLDEST")/bin/activate" &&
            TORCHINDUCTOR_CACHE_DIR="$PWD/target/inductor-$OLDEST" \
                python -m pytest -q --durations=15 tests --deselect "$nvrtc[compute_90]") > target/pytest-oldest.log 2>&1 &
        oldest=$!
        # shellcheck disable=SC1091
        . "$(venv_of "$NEWEST")/bin/activate"
        lint
        python -m pytest -q --durations=15 tests --deselect "$nvrtc[compute_80]"
        finish $oldest target/pytest-oldest.log
        echo "torch $OLDEST:"
        sed -n '/slowest 15 durations/,/short test summary/p' target/pytest-oldest.log
        tail -n 1 target/pytest-oldest.log
        ;;
    suite)
        setup "${2:?usage: $0 suite M (one of: $(echo $RELEASES))}"
        python -m pytest -q tests "${@:3}"
        ;;
    lint)
        setup "${EMAFUSE_TORCH:-$NEWEST}"
        lint
        ;;
    bench)
        setup "${EMAFUSE_TORCH:-$NEWEST}"
        python benchmarks/bench_optim.py "${@:2}"
        ;;
    *)
        echo "usage: $0 demo | test | suite M | lint | bench" >&2
        exit 2
        ;;
esac
