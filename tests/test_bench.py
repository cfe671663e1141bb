"""Smoke runs of the benchmarks at tiny sizes, so they do not rot."""

import subprocess
import sys

from conftest import REPO


def test_restart_preprocessing_benchmark_runs_and_the_restart_reads_the_cache(session_env):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "restart_preprocessing.py"), "--samples", "3000"],
                            env=session_env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    row = result.stdout.strip().splitlines()[-1].strip("|").split("|")
    first, restart = float(row[2]), float(row[3])
    assert row[0].strip() == "3,000" and restart < first
