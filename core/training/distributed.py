"""Data-parallel training on several workers with Ray Train (V2 API: ``TorchTrainer``).

Imported lazily by ``core.training.trainer`` for ``--workers N`` (N > 1), so core imports and trains without Ray.
The driver puts the train and val arrays into the object store once; each worker takes its shard of
the train split, caches it on its device and runs the ordinary ``Trainer`` with the model wrapped by
``ray.train.torch.prepare_model`` (DDP). Rank 0 validates (and broadcasts the metrics, see
``Trainer.fit``), reports a checkpoint per epoch to Ray Train storage, and returns the bundle's files,
which the driver writes to ``RUN/best``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from core.config import TrainConfig
from core.data.arrays import ARRAYS, SplitArrays, load_split, load_split_info
from core.io import atomic_dir, atomic_write_bytes

# Train V2 is the default in Ray 2.60; set it explicitly so an older default never switches APIs.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def _files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` as relative path -> bytes (checkpoints and bundles are small)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _write_files(directory: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def shard_rows(n: int, rank: int, world: int) -> np.ndarray:
    """Rows of this rank: strided, truncated so every rank has the same count (same steps per epoch)."""
    if n < world:
        raise ValueError(f"{n} training slices cannot be split over {world} workers")
    return np.arange(n)[rank::world][: n // world]


def _worker_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch

    from core.training.trainer import EpochResult, Trainer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig.from_dict(config["cfg"])
    train = SplitArrays(**ray.get(config["train"]))
    val = SplitArrays(**ray.get(config["val"]))
    shard = train.select(shard_rows(len(train), rank, world))
    # Different augmentation streams per rank; DDP broadcasts rank 0's initial weights to all.
    trainer = Trainer(cfg.replace(seed=cfg.seed + rank, workers=1), shard, val, config["split_info"],
                      device=ray.train.torch.get_device())
    trainer.cfg = cfg.replace(seed=cfg.seed)  # what the bundle records: the run's config, not a rank's
    checkpoint = ray.train.get_checkpoint()  # set when Ray Train restarts the workers after a failure
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                trainer.load_checkpoint(Path(d) / "trainer")
        elif config.get("resume") is not None:
            _write_files(Path(tmp) / "resume", ray.get(config["resume"]))
            trainer.load_checkpoint(Path(tmp) / "resume")
    trainer.net = ray.train.torch.prepare_model(trainer.model)

    def on_epoch(result: EpochResult, tr: Trainer) -> None:
        metrics = {"epoch": result.epoch, **result.metrics}
        if rank != 0:
            ray.train.report(metrics)  # every rank reports each epoch: report is a barrier
            return
        with tempfile.TemporaryDirectory() as tmp:
            tr.save_checkpoint(Path(tmp) / "trainer")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    trainer.fit(on_epoch)
    if rank != 0:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        bundle = trainer.export_bundle(Path(tmp) / "bundle", name=config["name"])
        return {"bundle": _files(bundle), "history": trainer.history, "best": trainer.best_metrics()}


def train_distributed(
    cfg: TrainConfig,
    data: str | os.PathLike,
    out: str | os.PathLike,
    name: str = "gliomaseg",
    resume: bool = False,
) -> dict[str, float]:
    """Train with ``cfg.workers`` Ray Train workers; writes RUN/best, RUN/metrics.csv, RUN/checkpoint.

    Starts a local Ray instance when none is running. GPUs are used when the cluster has them and
    ``cfg.device`` is not ``cpu``. ``cfg.batch_size`` is per worker (the global batch is N times it).
    """
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from core.io import write_csv

    out = Path(out).resolve()
    if not ray.is_initialized():
        ray.init()
    use_gpu = cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= cfg.workers
    if cfg.device.startswith("cuda") and not use_gpu:
        raise ValueError(f"--device {cfg.device} with {cfg.workers} workers, but the cluster lacks the GPUs")
    info = load_split_info(data)
    # One copy per node in the object store; workers read the arrays zero-copy from there.
    refs = {
        split: ray.put({k: np.asarray(getattr(load_split(data, split, mmap=False), k)) for k in ARRAYS})
        for split in ("train", "val")
    }
    resume_ref = ray.put(_files(out / "checkpoint")) if resume else None
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg.to_dict(), "split_info": info, "name": name, "resume": resume_ref,
                           "train": refs["train"], "val": refs["val"]},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
        # Train V2 persists reported checkpoints under storage_path/name; keep the latest two.
        run_config=RunConfig(name="ray_train", storage_path=str(out / "ray"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    returned = result.return_value
    if not returned:
        raise RuntimeError("Ray Train finished without a result from rank 0")
    with atomic_dir(out / "best") as tmp:
        _write_files(tmp, returned["bundle"])
    write_csv(out / "metrics.csv", returned["history"])
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d, atomic_dir(out / "checkpoint") as tmp:
            shutil.copytree(Path(d) / "trainer", tmp, dirs_exist_ok=True)
    atomic_write_bytes(out / "ray_result_path.txt", f"{result.path}\n".encode())
    return dict(returned["best"])
