#!/usr/bin/env bash
# emafuse's two commands on a fresh machine (Rust, Python 3.11 and pip are all it assumes):
#   ./dev.sh demo    set everything up, then train a small model with emafuse.AdamW beside torch's
#   ./dev.sh test    set everything up, then run the lints and the whole test suite (Rust and Python)
#   ./dev.sh lint    set everything up, then run the lints only
#   ./dev.sh bench   set everything up, then run the CPU benchmarks (writes benchmarks/RESULTS.md)
# Setup makes a virtual environment in .venv (override with EMAFUSE_VENV), installs torch 2.11.0 and
# the test dependencies from requirements/test.txt, and builds and installs emafuse from source.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${EMAFUSE_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    python -m pip install --quiet --disable-pip-version-check -r requirements/test.txt
    # torch is already in the environment: build against it instead of a private copy.
    python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps .
}

# Formatting and lints (part of `test`): rustfmt, clippy (warnings are errors), ruff, and the
# native module's type stubs against the built module.
lint() {
    cargo fmt --check
    cargo clippy --release --quiet --features python,pyo3/extension-module --all-targets -- -D warnings
    python -m ruff check --quiet .
    python -m mypy.stubtest emafuse._native
}

case "${1:-}" in
    demo)
        setup
        python examples/demo.py
        ;;
    test)
        setup
        lint
        cargo test --release --quiet
        python -m pytest -q tests
        ;;
    lint)
        setup
        lint
        ;;
    bench)
        setup
        python benchmarks/bench_optim.py "${@:2}"
        ;;
    *)
        echo "usage: $0 demo | test | lint | bench" >&2
        exit 2
        ;;
esac
