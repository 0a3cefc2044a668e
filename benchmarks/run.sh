#!/usr/bin/env bash
# Benchmarks our torchrunx against torchrunx 0.4.0 and torchrun; see benchmarks/README.md.
# All arguments go to compare.py, e.g. `bash benchmarks/run.sh --quick --impl 040,torchrun`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${BENCH_DRIVER_PYTHON:-python3}" "$here/compare.py" "$@"
