#!/usr/bin/env bash
# GPU tests and benchmark in one go, from the repository root of a machine with an NVIDIA GPU.
# Logs go to $OUT (default ./gpu-out). Missing packages can come as wheels in $WHEELS (default
# .whl, see benchmarks/gpu/RESULTS.md): ours' dependencies are installed into /tmp/site, torchrunx
# 0.4.0 and its own dependencies into /tmp/site040 (its import name is ours too).
# Without wheels, PYTHON_SITE and V040_SITE name directories that already hold them.
# SKIP_TESTS=1: benchmark only; TESTS_TIMEOUT, BENCH_TIMEOUT: seconds (240, 300). Arguments go to
# bench_gpu.py, e.g. `bash benchmarks/gpu/run_gpu.sh --impl ours,torchrun --processes 2`.
set -uo pipefail
out="${OUT:-./gpu-out}"
wheels="${WHEELS:-.whl}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), torch.cuda.get_device_name(0))'
    uname -r
    nproc
    echo "hostname: $(hostname)"
    getent hosts "$(hostname)" || echo "(hostname not in hosts file or DNS)"
    python3 -c 'import socket, time; t = time.time(); n = socket.getfqdn(); print(f"getfqdn: {n} in {time.time() - t:.3f} s")'
} 2>&1 | tee "$out/machine.txt"

site="${PYTHON_SITE:-/tmp/site}"
site040="${V040_SITE:-/tmp/site040}"
if [ -d "$wheels" ]; then
    install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
    ours=() v040=()
    for w in "$wheels"/*.whl; do
        case "$(basename "$w")" in
            torchrunx-0.4.0-* | fabric-* | invoke-* | decorator-* | Deprecated-* | wrapt-*) v040+=("$w") ;;
            *) ours+=("$w") ;;
        esac
    done
    if [ "${#ours[@]}" -gt 0 ]; then install "$site" "${ours[@]}" || exit 1; fi
    if [ "${#v040[@]}" -gt 0 ]; then install "$site040" "${v040[@]}" || exit 1; fi
fi

if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== tests" | tee "$out/pytest.txt"
    PYTHONPATH="$site:$PWD" timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -m gpu \
        tests/test_gpu.py -v -rA -p no:cacheprovider 2>&1 | tee -a "$out/pytest.txt"
    echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$out/pytest.txt"
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv 2>&1 |
        tee "$out/gpu-after-tests.txt"
fi

echo "== benchmark" | tee "$out/bench.txt"
PYTHONPATH="$site" timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/gpu/bench_gpu.py --ours "$PWD" \
    --v040 "$site040" --out-json "$out/bench.json" --out-md "$out/bench.md" "$@" 2>&1 |
    tee -a "$out/bench.txt"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$out/bench.txt"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv 2>&1 | tee "$out/gpu-after-bench.txt"
