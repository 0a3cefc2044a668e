#!/usr/bin/env bash
# Benchmarks our torchrunx against torchrunx 0.4.0 and torchrun; see benchmarks/README.md.
# All arguments go to compare.py, e.g. `bash benchmarks/run.sh --quick --impl 040,torchrun`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# compare.py runs as a module of the repository root, so that it imports `benchmarks` and `testbed`
# as packages; BENCH_CALLER_DIR keeps a relative --output relative to where this was started
export BENCH_CALLER_DIR="$PWD"
cd "$repo"
exec "${BENCH_DRIVER_PYTHON:-python3}" -m benchmarks.compare "$@"
