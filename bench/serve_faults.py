"""Replica-kill figures for bench/results/serve-faults-<device>.json.

The scenario (a bounded loopback load on two replicas, one killed mid-run, Serve replacing it) is the
test tests/test_faults_serve.py, which asserts the behaviour and writes its figures to a temporary folder;
this benchmark runs that test and keeps the figures here.

    python bench/serve_faults.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    env = {**os.environ, "GLIOMASEG_FAULTS_RESULTS": str(ROOT / "bench" / "results")}
    test = "tests/test_faults_serve.py::test_killed_replica_is_replaced_and_requests_keep_succeeding"
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", test], cwd=ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
