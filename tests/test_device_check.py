"""scripts/device_check.sh --dry-run: the GPU check's steps, on the CPU at tiny sizes, all green."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_dry_run_runs_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/device_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    steps = [line.split()[0] for line in summary]
    assert steps == ["gpu_tests", "bench_train_0", "bench_losses", "bench_predict", "bench_eval"]
    assert all(" rc=0 " in line for line in summary), summary
    # Without CUDA every gpu test is reported skipped, with its reason; none passes silently.
    tests = (tmp_path / "out" / "gpu_tests.txt").read_text()
    assert re.search(r"^\d+ skipped", tests, re.M) and "passed" not in tests and "needs CUDA" in tests
    assert "| cpu fp32" in (tmp_path / "out" / "bench_train_0.txt").read_text()
    assert "histogram update" in (tmp_path / "out" / "bench_eval.txt").read_text()
