"""The GPU checks stay runnable on machines without a GPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_checks_pass_as_a_dry_run_on_the_cpu():
    """tests/test_gpu.py is deselected here (CI has no GPU); with BLIPSEARCH_GPU_TEST_DEVICE=cpu the same checks
    run on the CPU in bf16, so that they do not rot before a GPU machine runs them (benchmarks/gpu_check.sh)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                           str(ROOT / "tests" / "test_gpu.py")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "BLIPSEARCH_GPU_TEST_DEVICE": "cpu"}, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 7 and not re.search(r"failed|error|skipped", summary), summary
