"""A search on a two-node Ray cluster in one machine (ray.cluster_utils.Cluster), for test_multinode.

Run as ``python tests/multinode_scenario.py PREPARED STORAGE`` in its own process: a Cluster cannot
share a process with another ray.init. Each node has 2 CPUs and each trial takes 1, so four trials
must spread over both nodes. Once a trial on the worker node has checkpointed, the worker node is
removed; its trials fail and Tune retries them from their checkpoints on the head node. Prints one
JSON line: per trial, its status and every reported epoch with the node that ran it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from tune_support import TINY_NET

SAMPLES, EPOCHS = 4, 6


def _raylet(node: Any) -> int:
    return int(node.all_processes["raylet"][0].process.pid)


def _node_of(pid: int, raylets: dict[int, str]) -> str | None:
    """Which node ran a trial process: the raylet among its ancestors (the nodes share an IP here)."""
    try:
        ancestors = [p.pid for p in psutil.Process(pid).parents()]
    except psutil.NoSuchProcess:
        return None
    return next((raylets[a] for a in ancestors if a in raylets), None)


def _lines(experiment: Path) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for path in experiment.glob("trial_*/result.json"):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # caught mid-write
                break
        out[path.parent.name[6:]] = rows
    return out


def main(prepared: str, storage: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    raylets = {_raylet(cluster.head_node): "head", _raylet(worker): "worker"}
    experiment = Path(storage) / "multi" / "ray"
    pid_node: dict[int, str | None] = {}  # a dead worker's processes cannot be traced later
    record: dict[str, Any] = {}

    def trace() -> dict[str, list[dict[str, Any]]]:
        """Every trial's rows so far, each new process traced to its node while it still lives."""
        lines = _lines(experiment)
        for rows in lines.values():
            for row in rows:
                if pid_node.get(row["pid"]) is None:
                    pid_node[row["pid"]] = _node_of(row["pid"], raylets)
        return lines

    def watch() -> None:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not record.get("done"):
            lines = trace()
            on_worker = [t for t, rows in lines.items()
                         if len(rows) >= 2 and pid_node.get(rows[-1]["pid"]) == "worker"]
            if on_worker and "removed_at" not in record:
                lines = trace()  # rows written since: their processes die with the node
                record["removed_at"] = time.time()
                record["epochs_at_removal"] = {t: len(r) for t, r in lines.items()}
                cluster.remove_node(worker, allow_graceful=False)  # as a preempted spot node goes
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    from tune.search import SearchOptions, run_search

    info = run_search(SearchOptions(
        data=Path(prepared), name="multi", storage=storage, num_samples=SAMPLES, max_epochs=EPOCHS,
        scheduler="none", max_concurrent=SAMPLES, cpus_per_trial=1.0, verbose=0, max_failures=3,
        fixed={**TINY_NET, "warmup_epochs": 0, "lr": {"loguniform": [1.0e-3, 1.0e-2]}},
    ))
    record["done"] = True
    thread.join(5)
    trials = {
        t: [{"epoch": r["epoch"], "iteration": r["training_iteration"], "node": pid_node.get(r["pid"]),
             "time": r["timestamp"]} for r in rows]
        for t, rows in _lines(experiment).items()
    }
    print("RESULT" + json.dumps({"run": {k: info[k] for k in ("status", "trials", "stop_reasons")},
                                 "trials": trials, **{k: v for k, v in record.items() if k != "done"}}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    main(sys.argv[1], sys.argv[2])
