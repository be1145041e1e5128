"""`python -m core train --data PREPARED --out RUN [options]`: one Trainer run with checkpoints and a bundle."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import TrainConfig, add_command, from_args
from core.data.arrays import load_split_info, split_hash
from core.io import read_json, write_csv, write_json

if TYPE_CHECKING:
    from core.training.trainer import EpochResult, Trainer

log = logging.getLogger(__name__)


@dataclass
class TrainRun:
    """Where a `core train` run reads and writes; the hyperparameters are its TrainConfig."""

    data: Path = field(metadata={"help": "prepared directory (python -m core data prepare)"})
    out: Path = field(metadata={"help": "run directory"})
    resume: bool = field(default=False, metadata={"help": "continue from RUN/checkpoint"})
    name: str = field(default="gliomaseg", metadata={"help": "bundle name"})


def register(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "train", train_command, TrainRun, TrainConfig, help="train one model on a prepared directory",
                description="Train one model; writes RUN/metrics.csv per epoch, RUN/checkpoint/, RUN/best/ (bundle).")


# What a fine-tuning run takes from its --init bundle where the command line leaves the default: the
# network it must match, and the preprocessing its weights were trained with.
INHERITED = ("arch", "filters", "dropout", "normalisation", "brain_crop")


def inherit_from_init(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with each INHERITED option that is at its default taken from the --init bundle's."""
    from core.bundle.files import CONFIG, resolve_bundle

    theirs = read_json(resolve_bundle(cfg.init) / CONFIG).get("hyperparameters", {})
    defaults = TrainConfig().to_dict()
    changes = {k: theirs[k] for k in INHERITED if k in theirs and getattr(cfg, k) == defaults[k]}
    if changes:
        log.info("--init %s: taking %s from the bundle", cfg.init, changes)
    return cfg.replace(**changes)


def train_command(args: argparse.Namespace) -> int:
    """`python -m core train --data PREPARED --out RUN [options]`."""
    from tqdm.auto import tqdm

    from core.training.trainer import Trainer  # here, not at the top: `python -m core data ...` starts without torch

    cfg = from_args(args)
    if cfg.init:
        cfg = inherit_from_init(cfg)
    out, data = Path(args.out), Path(args.data)
    info = load_split_info(data)
    checkpoint_dir = out / "checkpoint"
    if checkpoint_dir.exists() and not args.resume:
        raise FileExistsError(f"{out}: already holds a run; pass --resume to continue it, or another --out")
    if args.resume and not checkpoint_dir.exists():
        raise FileNotFoundError(f"{checkpoint_dir}: no checkpoint to resume from")
    write_json(out / "config.json", {**cfg.to_dict(), "data": str(data.resolve()), "split_hash": split_hash(info)})
    if cfg.workers > 1:
        from core.training.distributed import train_distributed  # lazily: Ray only for multi-worker runs

        best = train_distributed(cfg, data, out, name=args.name, resume=args.resume)
    else:
        trainer = Trainer.from_prepared(cfg, data)
        if args.resume:
            trainer.load_checkpoint(checkpoint_dir)
        bar = tqdm(total=cfg.epochs, initial=trainer.epoch, desc="train", unit="epoch")

        def on_epoch(result: EpochResult, tr: Trainer) -> None:
            write_csv(out / "metrics.csv", tr.history)  # rewritten whole: stays right across resumes
            tr.save_checkpoint(checkpoint_dir)
            m = result.metrics
            bar.update(1)
            bar.set_postfix(loss=f"{m['train_loss']:.3f}", dsc=f"{m['dsc_volume']:.3f}",
                            best=f"{tr.best_metric:.3f}@{tr.best_epoch}")

        try:
            trainer.fit(on_epoch)
        finally:
            bar.close()
        trainer.export_bundle(out / "best", name=args.name)
        best = trainer.best_metrics()
    shown = ", ".join(f"{k}={best[k]:.4f}" for k in ("dsc_volume", "dice_tumour", "dice_all") if k in best)
    print(f"best epoch {best.get('epoch')}: {shown}; bundle: {out / 'best'}")
    return 0
