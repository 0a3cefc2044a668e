"""The long soak: ``python -m benchmarks.soak [RUNS]`` (default 1000), from the repository root.

The soak of ``tests/test_soak.py`` with more runs: one launcher, 3 gloo workers, each run a random
fault on a random rank (raise, SIGKILL, SIGSEGV, ``os._exit``, ``sys.exit``, a child process with
200 MiB left running, DataLoader workers, or none). Every outcome must be right and, once
``run()`` has returned or raised, no process of the run may exist in any state. Prints the
pytest summary and the runs per second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    """Run the soak and report."""
    runs = sys.argv[1] if len(sys.argv) > 1 else "1000"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TORCHRUNX_SOAK_RUNS": runs}
    start = time.monotonic()
    test = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_soak.py"]
    done = subprocess.run(test, cwd=repo, env=env, check=False, timeout=3600)
    elapsed = time.monotonic() - start
    print(
        f"{runs} runs in {elapsed:.0f} s ({int(runs) / elapsed:.1f} runs/s), exit {done.returncode}"
    )
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
