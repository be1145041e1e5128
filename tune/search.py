"""`python -m tune run`: many trials of core's trainer in parallel, TPE-guided and ASHA-pruned.

Everything of a run lands in ``runs/NAME/`` (or ``S/NAME/`` with ``--storage S``): Ray's experiment in
``ray/``, the Optuna study in ``optuna.db``, ``leaderboard.csv``, ``history.json``, ``run.json`` and the
best trial's bundle in ``best/``. ``--resume`` continues an interrupted run through ``Tuner.restore``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.search.optuna import OptunaSearch

from core.config import METRICS, TrainConfig, add_command, from_args, meta
from core.data.arrays import load_split, load_split_info, split_hash
from core.evaluation.metrics import MINIMISED
from core.io import read_json, write_json
from tune import results
from tune.objective import objective_key
from tune.space import load_space
from tune.storage import STUDY_DB, RunStorage
from tune.trainable import train_trial

log = logging.getLogger(__name__)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are YAML (so 1e-3, true, [a, b], {uniform: [a, b]} work)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        out[key.strip().replace("-", "_")] = _number(yaml.safe_load(value))
    return out


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-3 (no dot) as a string; a flag value that looks like a number is one."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def sets_field(text: str) -> Any:
    """The ``--set KEY=VALUE`` option (repeatable; YAML values, ``parse_sets``) as a dict field."""
    return field(default_factory=dict, metadata=meta(
        text, flag="--set", argument={"action": "append", "default": [], "metavar": "KEY=VALUE"},
        from_arg=parse_sets))


@dataclass
class SearchOptions:
    """The `tune run` options (also the library entry point: ``run_search(SearchOptions(...))``)."""

    data: Path = field(metadata=meta("prepared directory"))
    name: str = field(metadata=meta("run name: writes runs/NAME (or STORAGE/NAME)"))
    config: Path | None = field(default=None, metadata=meta(
        "search-space YAML; its keys replace the default space"))
    num_samples: int = field(default=100, metadata=meta("trials"))
    max_epochs: int = field(default=TrainConfig.epochs, metadata=meta("epochs per trial"))
    search: str = field(default="tpe", metadata=meta("sampler", choices=("tpe", "random")))
    scheduler: str = field(default="asha", metadata=meta("trial scheduler", choices=("asha", "median", "none")))
    grace_period: int = field(default=5, metadata=meta("epochs before the scheduler may stop a trial"))
    reduction_factor: int = field(default=3, metadata=meta("ASHA's reduction factor"))
    cpus_per_trial: float = field(default=1.0, metadata=meta("CPUs per trial"))
    gpus_per_trial: float | None = field(default=None, metadata=meta(
        "GPU share per trial; unset: 0.25 where the cluster has GPUs, else 0"))
    max_concurrent: int | None = field(default=None, metadata=meta("most trials at once (unset: as resources allow)"))
    metric: str = field(default=TrainConfig.metric, metadata=meta("the objective", choices=METRICS))
    storage: str | None = field(default=None, metadata=meta("directory or s3://bucket/prefix (unset: runs)"))
    resume: bool = field(default=False, metadata=meta("continue an interrupted run"))
    wandb_project: str | None = field(default=None, metadata=meta(
        "log trials to Weights & Biases (offline without WANDB_API_KEY)"))
    seed: int = field(default=0, metadata=meta("seeds the sampler and every trial"))
    fixed: dict[str, Any] = sets_field(
        "fix or override one space key (YAML value: constant, list, {loguniform: [a, b]}); repeatable")
    max_failures: int = field(default=2, metadata=meta("retries per trial, from its last checkpoint"))
    verbose: int = field(default=1, metadata=meta(
        "no progress table", flag="--quiet", argument={"action": "store_const", "const": 0}))
    ensemble: int = field(default=0, metadata=meta(
        "also build the ensemble of the K best trials in NAME/ensemble (tune ensemble)",
        argument={"metavar": "K"}))

    def validate(self) -> None:
        if self.search not in ("tpe", "random"):
            raise ValueError(f"--search {self.search!r}: tpe or random")
        if self.scheduler not in ("asha", "median", "none"):
            raise ValueError(f"--scheduler {self.scheduler!r}: asha, median or none")
        if self.metric not in METRICS:
            raise ValueError(f"--metric {self.metric!r}: one of {', '.join(METRICS)}")
        for name in ("num_samples", "max_epochs", "grace_period"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.reduction_factor < 2:
            raise ValueError("--reduction-factor must be >= 2")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError("--max-concurrent must be >= 1")
        gpus = self.gpus_per_trial
        if gpus is not None and (gpus < 0 or (gpus > 1 and not float(gpus).is_integer())):
            # Ray shares a GPU only in fractions of one; above one it places whole GPUs
            raise ValueError(f"--gpus-per-trial {gpus}: a fraction of one GPU (e.g. 0.25) or a whole number")


def run_search(opts: SearchOptions) -> dict[str, Any]:
    """Run (or resume) a search; returns run.json's content. Uses the current Ray, or starts one."""
    import ray

    opts.validate()
    storage = _open_storage(opts)
    data = Path(opts.data).resolve()
    info = load_split_info(data)
    # Loaded into memory (not memory-mapped): the object store gets one real copy per node.
    train, val = load_split(data, "train", mmap=False), load_split(data, "val", mmap=False)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, configure_logging=False)
    gpus, slots = _trial_resources(opts)
    wandb = None
    if opts.wandb_project:
        from tune.wandb_logging import wandb_settings

        wandb = wandb_settings(opts.wandb_project, opts.name, str(storage.local))  # W&B adds wandb/
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, train=train, val=val, split_info=info, wandb=wandb),
        {"cpu": opts.cpus_per_trial, "gpu": gpus},
    )
    if opts.resume:
        tuner, run_info = _restored_tuner(storage, trainable, data, info)
    else:
        tuner, run_info = _new_tuner(opts, storage, trainable, data, info, gpus)
    with tune_env(slots):
        grid = tuner.fit()
    run_info = finish(storage, grid, run_info, train, val, info)
    if opts.ensemble > 1:
        from tune.ensemble import build_run_ensemble

        if storage.remote:
            log.warning("--ensemble: the run is on %s; build it from a local copy with `tune ensemble`", storage.uri)
        else:
            run_info["ensemble"] = build_run_ensemble(storage.local, opts.ensemble, data=data)
    return run_info


def _open_storage(opts: SearchOptions) -> RunStorage:
    """The run's storage: an existing run only with --resume (its study and run.json pulled), else a new one."""
    storage = RunStorage.open(opts.name, opts.storage)
    if opts.resume:
        if not storage.exists():
            raise FileNotFoundError(f"{storage.uri}: no run to resume")
        storage.pull(STUDY_DB, "run.json")
    elif storage.exists():
        raise FileExistsError(f"{storage.uri}: already holds a run; pass --resume to continue it, or another --name")
    storage.local.mkdir(parents=True, exist_ok=True)
    return storage


def _trial_resources(opts: SearchOptions) -> tuple[float, int]:
    """(GPUs per trial, trials that fit at once) on the running Ray cluster."""
    import ray

    cluster = ray.cluster_resources()
    gpus = opts.gpus_per_trial
    if gpus is None:
        gpus = 0.25 if cluster.get("GPU", 0) > 0 else 0.0
    if gpus > cluster.get("GPU", 0):
        raise ValueError(f"--gpus-per-trial {gpus}: the Ray cluster has {cluster.get('GPU', 0)} GPU(s)")
    slots = cluster.get("CPU", 1) // max(opts.cpus_per_trial, 1e-3)
    if gpus > 0:
        slots = min(slots, cluster["GPU"] // gpus)
    return gpus, int(max(1, min(slots, opts.max_concurrent or slots)))


def _restored_tuner(storage: RunStorage, trainable: Any, data: Path, info: dict[str, Any]
                    ) -> tuple[tune.Tuner, dict[str, Any]]:
    """The interrupted run's Tuner; metric, mode and scheduler are the run's own (run.json, and Ray's restored
    state), not the options'."""
    run_info = read_json(storage.local / "run.json")
    if run_info.get("split_hash") != split_hash(info):
        log.warning("%s: resuming on a different data split than the run started with", data)
    for name, action in storage.repair_torn_snapshots().items():
        log.warning("Ray snapshot %s was cut short by the interruption: %s", name, action)
    tuner = tune.Tuner.restore(
        storage.experiment_path, trainable, resume_unfinished=True, resume_errored=True,
        storage_filesystem=storage.fs,
    )
    return tuner, run_info


def _new_tuner(opts: SearchOptions, storage: RunStorage, trainable: Any, data: Path, info: dict[str, Any],
               gpus: float) -> tuple[tune.Tuner, dict[str, Any]]:
    """A new run's Tuner over its search space, and its run.json (written and pushed before any trial)."""
    space = load_space(opts.config, opts.fixed)
    mode, key = ("min" if opts.metric in MINIMISED else "max"), objective_key(opts.metric)
    constants = {"seed": opts.seed, **space.constants, "epochs": opts.max_epochs, "metric": opts.metric}
    run_info = {
        "name": opts.name, "storage": storage.uri, "data": str(data), "split_hash": split_hash(info),
        "metric": opts.metric, "mode": mode, "objective": key, "searched": list(space.searched),
        "space": space.describe(), "constants": constants, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "scheduler": opts.scheduler, "gpus_per_trial": gpus, "status": "running",
    }
    write_json(storage.local / "run.json", run_info)
    storage.push("run.json")
    tuner = tune.Tuner(
        trainable,
        param_space=constants,
        tune_config=tune.TuneConfig(
            metric=key, mode=mode, num_samples=opts.num_samples, scheduler=_scheduler(opts),
            search_alg=_searcher(opts, space, storage, key, mode), max_concurrent_trials=opts.max_concurrent,
            # A finished trial's worker (torch imported, data fetched) takes the next trial.
            reuse_actors=True, trial_dirname_creator=trial_dirname,
        ),
        run_config=_run_config(opts, storage, mode),
    )
    return tuner, run_info


@contextlib.contextmanager
def tune_env(slots: int) -> Iterator[None]:
    """Tune settings read from the environment, for this fit only (a user's own values win)."""
    values = {
        # Ray snapshots its experiment state at most this often, but deletes superseded checkpoints at
        # once: a driver killed in between would resume trials from checkpoints that no longer exist.
        # Snapshot on every result (tiny next to an epoch) so --resume always finds what it names.
        "TUNE_GLOBAL_CHECKPOINT_S": "0",
        # Tune also snapshots whenever a trial has written num_to_keep checkpoints; with epochs of
        # seconds that is often and harmless, so its warning is noise.
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
        # With a searcher Tune keeps one trial pending at a time, so trials would start one worker
        # launch apart; let as many wait as can run at once (TPE's first trials are random anyway).
        "TUNE_MAX_PENDING_TRIALS_PG": str(slots),
    }
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch that survives a resume where the study on disk is ahead of Ray's experiment state.

    A driver killed after a trial finished (its Optuna trial COMPLETE in optuna.db) but before Ray
    snapshotted that, resumes the trial; its re-reported result would raise UpdateFinishedTrialError
    and end the whole run. The study already holds that trial's value, so the result is dropped.
    """

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        import optuna

        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            log.debug("trial %s already finished in the Optuna study; result not re-recorded", trial_id)


def _searcher(opts: SearchOptions, space: Any, storage: RunStorage, key: str, mode: str) -> Any:
    import optuna

    if not space.searched:
        return None  # nothing to search: num_samples repeats of the constants
    sampler = (
        optuna.samplers.TPESampler(seed=opts.seed) if opts.search == "tpe"
        else optuna.samplers.RandomSampler(seed=opts.seed)
    )
    return ResumableOptunaSearch(
        space=space.searched, metric=key, mode=mode, sampler=sampler, study_name=opts.name,
        storage=optuna.storages.RDBStorage(storage.study_url),
    )


def _scheduler(opts: SearchOptions) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    if opts.scheduler == "asha":
        return ASHAScheduler(
            time_attr="epoch", max_t=opts.max_epochs, grace_period=min(opts.grace_period, opts.max_epochs),
            reduction_factor=opts.reduction_factor,
        )
    if opts.scheduler == "median":
        return MedianStoppingRule(time_attr="epoch", grace_period=opts.grace_period, min_samples_required=3)
    return FIFOScheduler()


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _run_config(opts: SearchOptions, storage: RunStorage, mode: str) -> Any:
    # Explicit result loggers: the leaderboard and learning curves read them, and Tune's automatic
    # ones can be switched off by environment (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS).
    callbacks: list[Any] = [KeepDriverResults(), KeepDriverProgress()]
    callbacks.append(PushStudy(storage) if storage.remote else KeepWholeSnapshot(storage))
    return tune.RunConfig(
        name="ray",
        storage_path=storage.ray_storage_path,
        storage_filesystem=storage.fs,
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute=opts.metric, checkpoint_score_order=mode,
        ),
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        sync_config=tune.SyncConfig(sync_period=10),
        callbacks=callbacks,
        verbose=opts.verbose,
    )


class _DriverCopyFirst:
    """A result logger that restarts a retried trial's file from the driver's own copy where it has one.

    Tune's loggers write on the driver and upload every ``sync_period``; when a trial is retried after
    its node died they overwrite the driver's file with the uploaded one, which can be an upload from
    before the trial's first epochs (empty), so those epochs vanish from the learning curves. The
    driver's file holds every row the uploaded one does, so the upload is read only where the driver
    has none (a resume in a new driver process).
    """

    def _restore_from_remote(self, file_name: str, trial: Any) -> None:
        local = Path(trial.local_path, file_name)
        if local.exists() and local.stat().st_size > 0:
            return
        super()._restore_from_remote(file_name, trial)  # type: ignore[misc]


class KeepDriverResults(_DriverCopyFirst, JsonLoggerCallback):
    """Tune's result.json logger, keeping the driver's rows of a retried trial."""


class KeepDriverProgress(_DriverCopyFirst, CSVLoggerCallback):
    """Tune's progress.csv logger, keeping the driver's rows of a retried trial."""


class KeepWholeSnapshot(tune.Callback):
    """Keeps a whole copy of Ray's newest experiment snapshot beside it (local runs).

    Tune saves its snapshot files and then asks the callbacks for their state, so at that moment the files
    are whole: copying them then gives ``--resume`` a snapshot one event old to fall back on where a kill
    tore the newest (RunStorage.repair_torn_snapshots). On S3 the driver uploads only whole files.
    """

    def __init__(self, storage: RunStorage) -> None:
        self.storage = storage

    def get_state(self) -> None:
        self.storage.keep_whole_snapshot()
        return None  # nothing of its own to save


class PushStudy(tune.Callback):
    """Uploads optuna.db to S3 as trials start and end (SQLite lives in a local mirror), so a resume
    on another machine finds the study as the experiment state left it."""

    def __init__(self, storage: RunStorage) -> None:
        self.storage = storage

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.storage.push(STUDY_DB)

    on_trial_complete = on_trial_error = on_trial_start


def finish(
    storage: RunStorage, grid: Any, run_info: dict[str, Any], train: Any, val: Any, info: dict[str, Any]
) -> dict[str, Any]:
    """Leaderboard, history and best bundle from the finished grid; uploads them for S3 runs."""
    trials = results.collect(grid, run_info["metric"], run_info["scheduler"])
    results.write_leaderboard(storage.local / "leaderboard.csv", trials, run_info.get("searched", []))
    results.write_history(storage.local / "history.json", trials)
    best = results.export_best(trials, storage.local / "best", train, val, info, name=run_info["name"])
    counts = Counter(t["stop_reason"] for t in trials)
    run_info.update(
        status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), trials=len(trials),
        stop_reasons=dict(counts),
        best_trial=best and {k: best[k] for k in ("trial_id", "objective", "best_epoch", "config")},
    )
    write_json(storage.local / "run.json", run_info)
    storage.push(STUDY_DB, "leaderboard.csv", "history.json", "run.json", "best")
    return run_info


# ---- command line ------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "run", run_command, SearchOptions, doc=__doc__,
                help="hyperparameter search with Ray Tune (Optuna TPE + ASHA)")


def run_command(args: argparse.Namespace) -> int:
    opts = from_args(args, SearchOptions)
    info = run_search(opts)
    best = info.get("best_trial")
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(info.get("stop_reasons", {}).items()))
    print(f"{info['trials']} trials ({reasons}); leaderboard: {info['storage']}/leaderboard.csv")
    if best:
        print(f"best trial {best['trial_id']}: {info['objective']}={best['objective']:.4f} at epoch "
              f"{best['best_epoch']}; bundle: {info['storage']}/best")
    if info.get("ensemble"):
        ens = info["ensemble"]
        print(f"ensemble of {ens['ensemble']['top']}: val dsc_volume {ens['ensemble']['val']['dsc_volume']:.4f} vs "
              f"best single trial {ens['best_single']['val']['dsc_volume']:.4f} (both selected on val); "
              f"bundle: {ens['ensemble']['bundle']}")
    return 0
