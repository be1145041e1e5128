"""Multi-node on one machine: a search on a head + worker ray.cluster_utils.Cluster places trials on
both nodes, and losing the worker node mid-run still ends with every trial finished, the lost ones
resumed from their checkpoints on the head node (see tests/multinode_scenario.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tune_support import ROOT, driver_env


@pytest.mark.slow
def test_trials_spread_over_nodes_and_survive_losing_the_worker(prepared_dir, tmp_path):
    from multinode_scenario import EPOCHS, SAMPLES

    env = driver_env(None)  # its own cluster, not the session's
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_scenario.py"), str(prepared_dir),
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])
    trials = out["trials"]
    assert out["run"]["status"] == "finished" and out["run"]["trials"] == SAMPLES
    assert out["run"]["stop_reasons"] == {"completed": SAMPLES}, out["run"]

    first_nodes = {rows[0]["node"] for rows in trials.values()}
    assert first_nodes == {"head", "worker"}, trials  # 2 CPUs a node, 1 a trial: both nodes used
    assert "removed_at" in out, "the worker node was never removed"
    moved = [t for t, rows in trials.items() if any(r["node"] == "worker" for r in rows)
             and rows[-1]["node"] == "head"]
    assert moved, "no trial on the worker was resumed elsewhere"
    for trial_id, rows in trials.items():
        epochs = [r["epoch"] for r in rows]
        assert set(epochs) == set(range(1, EPOCHS + 1)) and epochs[-1] == EPOCHS, (trial_id, epochs)
        after = [r for r in rows if r["time"] > out["removed_at"] + 1]
        assert all(r["node"] in ("head", None) for r in after), (trial_id, rows)
    for trial_id in moved:
        rows = trials[trial_id]
        last_worker = max(i for i, r in enumerate(rows) if r["node"] == "worker")
        # Resumed from its last checkpoint (every reported epoch has one), not restarted from zero.
        assert rows[last_worker + 1]["epoch"] == rows[last_worker]["epoch"] + 1, rows
