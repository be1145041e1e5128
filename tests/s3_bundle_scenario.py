"""Serve an s3:// bundle on a two-node Ray cluster in one machine (ray.cluster_utils.Cluster), for
test_bundle_uri.

Run as ``python tests/s3_bundle_scenario.py URI SLICE.npy WORKER_CACHE PORT`` in its own process (a
Cluster cannot share a process with another ray.init), with AWS_ENDPOINT_URL and the keys of a local
S3 server in the environment and GLIOMASEG_BUNDLE_CACHE set to the head node's cache. The worker node
gets its own cache folder, empty; the head has 1 CPU and the model replica asks for 2, so it can only
run on the worker, which must fetch the bundle from S3 itself. Prints one JSON line: the mask's tumour
pixels and digest from ``POST /v1/segment`` and the bundle version ``GET /v1/model`` reports.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np


def main(uri: str, slice_path: str, worker_cache: str, port: int) -> None:
    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve.app import ServeSettings, start

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=3, env_vars={"GLIOMASEG_BUNDLE_CACHE": worker_cache})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        # One proxy: both nodes share 127.0.0.1 here, so a proxy per node would fight over the port.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings(bundle=uri, cpus_per_replica=2.0, max_batch_size=4)
        url = start(settings, "127.0.0.1", port, timeout_s=240)
        body = Path(slice_path).read_bytes()
        r = httpx.post(f"{url}/v1/segment?format=npy", content=body,
                       headers={"Content-Type": "application/x-npy"}, timeout=60)
        r.raise_for_status()
        mask = np.load(io.BytesIO(r.content), allow_pickle=False)
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
        print("RESULT" + json.dumps({
            "tumour_pixels": int(np.count_nonzero(mask)), "shape": list(mask.shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(mask).tobytes()).hexdigest(),
            "version": info.get("version"),
        }), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
