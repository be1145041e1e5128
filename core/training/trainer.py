"""The training engine: Trainer (one process, one device); `python -m core train` is core/training/cli.py.

Data lives on the device for the whole run (core.training.loader), batches are augmented there (core.training.augment),
the loss is computed in fp32 outside autocast, and each epoch ends with a full validation pass whose
metrics drive best-epoch selection and early stopping. tune/ drives the same Trainer through
``fit(on_epoch=...)``; core.training.distributed wraps it for Ray Train data-parallel runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceFocalLoss

from core.bundle import Bundle, make_bundle_config, save_bundle
from core.config import TrainConfig
from core.data.arrays import SplitArrays, load_split, load_split_info, split_hash
from core.data.preprocessing import Preprocessing
from core.evaluation.metrics import is_better, segmentation_metrics, worst_value
from core.evaluation.selection import ValSplit, choose_inference, choose_one_slice
from core.inference.resize import normalise
from core.networks.models import SIZE_MULTIPLE, build_model, init_output_bias
from core.runtime import autocast, resolve_device, seed_everything
from core.training import checkpoint as ckpt
from core.training.augment import augment_batch, settings_from_config, substitute_sequences
from core.training.init import load_init
from core.training.loader import DeviceDataset

log = logging.getLogger(__name__)

# Config fields that change the network's shape: a checkpoint only resumes into the same ones.
MODEL_FIELDS = ("arch", "filters", "image_size", "normalisation", "brain_crop")


@dataclass
class EpochResult:
    epoch: int  # 1-based
    metrics: dict[str, float]


def make_loss(cfg: TrainConfig, multiclass: bool) -> torch.nn.Module:
    """DiceFocal (default) or DiceCE; sigmoid for one logit, softmax + one-hot labels for K+1 logits.

    ``batch=True`` pools Dice over the batch: most slices are tumour-free, and a per-slice Dice on an
    empty slice is a cliff (any false positive costs the whole slice).
    """
    act = {"softmax": True, "to_onehot_y": True} if multiclass else {"sigmoid": True}
    if cfg.loss == "dicece":
        return DiceCELoss(batch=True, lambda_dice=cfg.lambda_dice, lambda_ce=cfg.lambda_focal, **act)
    return DiceFocalLoss(batch=True, lambda_dice=cfg.lambda_dice, lambda_focal=cfg.lambda_focal, **act)


def preprocessing_from_config(cfg: TrainConfig) -> Preprocessing:
    """The bundle's preprocessing a run trains with (and every inference path then applies)."""
    return Preprocessing(normalisation=cfg.normalisation, crop=cfg.brain_crop, sequences=cfg.sequences,
                         context=cfg.context, context_sequences=cfg.context_sequences)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _dist_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Trainer:
    """One training run on one device. ``fit`` may be called again after ``load_checkpoint``."""

    def __init__(
        self,
        cfg: TrainConfig,
        train: SplitArrays,
        val: SplitArrays,
        split_info: dict[str, Any],
        device: str | torch.device | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.split_info = split_info
        self.device = device if isinstance(device, torch.device) else resolve_device(device or cfg.device)
        seed_everything(cfg.seed)
        # A private generator drives sampling and augmentation: deterministic per seed, and checkpointable.
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        classes = int(split_info.get("classes", 1))
        self.class_names = list(split_info.get("class_names") or ["background", "tumour"])
        if len(self.class_names) != classes + 1:
            raise ValueError(f"split.json: {classes} classes but class_names {self.class_names}")
        self.multiclass = classes > 1
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"empty split: {len(train)} train and {len(val)} val slices")
        # Trained at cfg.image_size (the data's own when 0); validated at the data's own resolution, the
        # probabilities resized back, so trials at different sizes compare on the same masks.
        self.native_size = (int(val.images.shape[2]), int(val.images.shape[3]))
        size = (cfg.image_size, cfg.image_size) if cfg.image_size else None
        self.preprocessing = preprocessing_from_config(cfg)
        self.train_data = DeviceDataset(train, self.device, size=size, preprocessing=self.preprocessing)
        self.val_data = DeviceDataset(val, self.device, size=size, preprocessing=self.preprocessing)
        self.val = val
        self.val_truth = np.ascontiguousarray(val.masks)
        self.val_patients = np.asarray(val.patients).astype(str)
        self.val_slices = np.asarray(val.slices)
        self.image_size = self.val_data.image_size
        for size in (*self.image_size, cfg.crop or SIZE_MULTIPLE):
            if size % SIZE_MULTIPLE:
                raise ValueError(
                    f"image size {self.image_size} and crop {cfg.crop} must be multiples of {SIZE_MULTIPLE}"
                )
        self.out_channels = classes + 1 if self.multiclass else 1
        # NHWC convolutions are 1.23x a training step on this project's CPU (bench/step_cost.py); GPUs keep
        # their own default. Weights are saved contiguous either way (bundle, checkpoint).
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.in_channels = len(self.preprocessing.channel_names)
        self.model = build_model(cfg.arch, self.in_channels, self.out_channels, cfg.filters, cfg.dropout).to(
            self.device, memory_format=self.memory_format)
        # fine-tuning: the bundle's weights
        self.init = load_init(self.model, cfg, self.preprocessing) if cfg.init else None
        if self.init is None:
            init_output_bias(self.model, self._class_prior(self.out_channels), self.in_channels)
        # Dropout draws from torch's global RNG; keep this run's own copy of it, so two trainers in one
        # process (tests, tune's reuse) do not perturb each other and a checkpoint restores it exactly.
        self._cpu_rng = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        self.net: torch.nn.Module = self.model  # what the training step calls (a DDP wrapper in Ray Train)
        self.augment = settings_from_config(cfg) if cfg.augment else None
        self.loss_fn = make_loss(cfg, self.multiclass)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = self.train_data.steps_per_epoch(cfg.batch_size)
        schedule = warmup_cosine(cfg.warmup_epochs * self.steps_per_epoch, cfg.epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.epoch = 0
        self.best_metric = worst_value(cfg.metric)
        self.best_epoch = 0
        self.history: list[dict[str, float]] = []
        self.best_state: dict[str, torch.Tensor] | None = None  # CPU copy of the best epoch's weights
        self.should_stop = False  # an on_epoch callback may set this to end fit() after its epoch
        self.val_pred: np.ndarray | None = None  # last validation masks (rank 0), without post-processing

    @classmethod
    def from_prepared(
        cls, cfg: TrainConfig, prepared: str | os.PathLike, device: str | torch.device | None = None
    ) -> Trainer:
        """A Trainer on the train and val splits of a prepared directory."""
        info = load_split_info(prepared)
        return cls(cfg, load_split(prepared, "train"), load_split(prepared, "val"), info, device)

    def _class_prior(self, out_ch: int) -> list[float]:
        """Pixel share of the foreground (binary) or of each label (multi-class) in the train split."""
        n = max(2, out_ch)
        counts = torch.zeros(n, dtype=torch.float64, device=self.device)
        for chunk in self.train_data.masks.split(128):  # bounded temporaries on large splits
            counts += torch.bincount(chunk.flatten().long(), minlength=n)[:n]
        shares = (counts / counts.sum().clamp(min=1.0)).tolist()
        return [float(sum(shares[1:]))] if out_ch == 1 else [float(s) for s in shares[:out_ch]]

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        cuda = [self.device] if self._cuda_rng is not None else []
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(self._cpu_rng)
            if self._cuda_rng is not None:
                torch.cuda.set_rng_state(self._cuda_rng, self.device)
            yield
            self._cpu_rng = torch.get_rng_state()
            if self._cuda_rng is not None:
                self._cuda_rng = torch.cuda.get_rng_state(self.device)

    # ---- one epoch ----------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        """One pass over the (device-resident) train split; returns mean loss and final lr."""
        cfg = self.cfg
        self.net.train()
        batches = self.train_data.epoch_batches(cfg.batch_size, self.gen, cfg.oversample, cfg.hard_negatives)
        total = torch.zeros((), device=self.device)
        with self._own_rng():
            self._train_steps(batches, total)
        mean_loss = float(total) / len(batches)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"non-finite training loss ({mean_loss}) in epoch {self.epoch + 1}")
        return {"train_loss": mean_loss, "lr": float(self.scheduler.get_last_lr()[0])}

    def _train_steps(self, batches: torch.Tensor, total: torch.Tensor) -> None:
        cfg = self.cfg
        for idx in batches:
            x, y, stats = self.train_data.batch(idx)
            x, stats = substitute_sequences(x, stats, cfg.missing_sequence, self.gen)
            if self.augment is not None:  # the warp on pixel values, then standardisation, then intensity
                x, y = augment_batch(x, y, self.augment, self.gen, normalise=lambda v, s=stats: normalise(v, s))
            else:
                x = normalise(x, stats)
            with autocast(self.device, cfg.amp):
                logits = self.net(x.contiguous(memory_format=self.memory_format))
            # fp32 loss outside autocast: bf16 Dice sums lose precision (fp16 gave NaN in the earlier study)
            loss = self.loss_fn(logits.float(), y[:, None].float())
            if cfg.hard_negatives > 0:
                self.train_data.note_predictions(idx, logits.detach(), cfg.threshold)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            total += loss.detach()  # summed on the device: one host sync per epoch, not per step

    def _probabilities(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.cfg.amp):
            logits = model(x)
        logits = logits.float()
        return logits.softmax(1) if self.multiclass else logits.sigmoid()

    @torch.no_grad()
    def predict_val(self, model: torch.nn.Module | None = None, tta: bool = False) -> np.ndarray:
        """Label masks (N,H,W) uint8 for the val split at the data's own resolution, without
        post-processing; ``tta`` averages the probabilities with the left-right mirrored pass."""
        model = model or self.model
        model.eval()
        out = []
        for idx in self.val_data.eval_batches(self.cfg.eval_batch_size):
            x, _, stats = self.val_data.batch(idx)
            x = normalise(x, stats)
            probs = self._probabilities(model, x)
            if tta:  # the mirror of a slice's crop is the crop of its mirror (core.data.preprocessing)
                probs = 0.5 * (probs + self._probabilities(model, x.flip(-1)).flip(-1))
            probs = self.val_data.restore(probs, idx)
            masks = probs.argmax(1) if self.multiclass else probs[:, 0] > self.cfg.threshold
            out.append(masks.to(torch.uint8))
        return torch.cat(out).cpu().numpy()

    def val_metrics(self, pred: np.ndarray) -> dict[str, float]:
        names = self.class_names if self.multiclass else None
        return segmentation_metrics(pred, self.val_truth, self.val_patients, names)

    def validate(self) -> dict[str, float]:
        """Metrics of the current weights on val; the masks stay in ``val_pred`` (e.g. for logging)."""
        self.val_pred = self.predict_val()
        return self.val_metrics(self.val_pred)

    def stop_reason(self) -> str | None:
        """Why ``fit`` ends after the epochs done so far: "completed", "patience", or None (it goes on)."""
        if self.epoch >= self.cfg.epochs:
            return "completed"
        if self.cfg.patience > 0 and self.epoch and self.epoch - self.best_epoch >= self.cfg.patience:
            return "patience"
        return None

    # ---- the loop -----------------------------------------------------------------------------------
    def fit(self, on_epoch: Callable[[EpochResult, Trainer], None] | None = None) -> dict[str, float]:
        """Train from ``self.epoch + 1`` to ``cfg.epochs`` with early stopping; returns the best metrics."""
        cfg = self.cfg
        rank, world = _dist_rank()
        if self.stop_reason() == "patience":
            return self.best_metrics()  # resumed from a run that had already stopped early
        for epoch in range(self.epoch + 1, cfg.epochs + 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics = self.train_epoch()
            # Under data parallelism rank 0 validates and broadcasts, so every rank takes the same
            # best-epoch and early-stopping decisions (and the others do not repeat the work).
            val = self.validate() if rank == 0 else None
            if world > 1:
                box = [val]
                torch.distributed.broadcast_object_list(box, src=0)
                val = box[0]
            assert val is not None
            metrics.update(val)
            metrics["epoch_seconds"] = time.perf_counter() - start
            # this process's CPU seconds over all its threads: wall-clock hides how many cores an epoch took
            metrics["epoch_cpu_seconds"] = time.process_time() - cpu_start
            self.epoch = epoch
            if (cfg.keep == "last" or self.best_state is None
                    or is_better(cfg.metric, metrics[cfg.metric], self.best_metric)):
                self.best_metric, self.best_epoch = float(metrics[cfg.metric]), epoch
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.history.append({"epoch": epoch, **metrics})
            if on_epoch is not None:
                on_epoch(EpochResult(epoch, dict(metrics)), self)
            if self.should_stop or self.stop_reason() == "patience":
                break
        return self.best_metrics()

    def best_metrics(self) -> dict[str, float]:
        """The history row of the best epoch (``{}`` before the first epoch)."""
        return next((dict(h) for h in self.history if h["epoch"] == self.best_epoch), {})

    # ---- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        """Everything needed to resume (and to export the best epoch), with no pickle."""
        tensors = ckpt.prefixed("model", self.model.state_dict())
        if self.best_state is not None:
            tensors.update(ckpt.prefixed("best", self.best_state))
        optim_tensors, optim_meta = ckpt.optimizer_to_flat(self.optimizer.state_dict())
        tensors.update(optim_tensors)
        tensors.update(ckpt.rng_state(self.gen, self._cpu_rng, self._cuda_rng))
        tensors["false_positive"] = self.train_data.false_positive.cpu()  # the hard negatives' weights
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        meta = {
            "epoch": self.epoch, "best_metric": self.best_metric, "best_epoch": self.best_epoch,
            "history": self.history, "config": self.cfg.to_dict(), "optimizer": optim_meta, "scheduler": sched,
            "split_hash": split_hash(self.split_info),
        }
        ckpt.write_checkpoint(directory, tensors, meta)

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Restore a checkpoint written by ``save_checkpoint``; ``fit`` then continues at epoch + 1."""
        tensors, meta = ckpt.read_checkpoint(directory)
        saved = meta["config"]
        defaults = TrainConfig().to_dict()  # a checkpoint from before a field existed had its default
        changed = [f for f in MODEL_FIELDS if saved.get(f, defaults[f]) != getattr(self.cfg, f)]
        if changed:
            raise ValueError(f"{directory}: checkpoint has a different {', '.join(changed)} than this run")
        if meta.get("split_hash") != split_hash(self.split_info):
            log.warning("%s: checkpoint was trained on a different data split", directory)
        self.model.load_state_dict(ckpt.unprefixed("model", tensors))
        best = ckpt.unprefixed("best", tensors)
        self.best_state = best or None
        self.optimizer.load_state_dict(ckpt.optimizer_from_flat(tensors, meta["optimizer"]))
        if "false_positive" in tensors and len(tensors["false_positive"]) == len(self.train_data):
            self.train_data.false_positive.copy_(tensors["false_positive"])
        self.scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None]})
        cpu, cuda = ckpt.restore_rng(tensors, self.gen, meta.get("python_random"))
        self._cpu_rng = cpu
        if self._cuda_rng is not None and cuda is not None:
            self._cuda_rng = cuda
        self.epoch, self.best_epoch = int(meta["epoch"]), int(meta["best_epoch"])
        self.best_metric = float(meta["best_metric"])
        self.history = list(meta["history"])
        self.should_stop = False

    # ---- export -------------------------------------------------------------------------------------
    def best_model(self) -> torch.nn.Module:
        """A fresh copy of the network with the best epoch's weights (the current ones before any)."""
        model = build_model(self.cfg.arch, self.in_channels, self.out_channels, self.cfg.filters, self.cfg.dropout)
        model.load_state_dict(self.best_state or self.model.state_dict())
        return model.to(self.device).eval()

    def choose_inference(self, model: torch.nn.Module) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """TTA and post-processing chosen together on val (core.evaluation.selection): each is kept only
        where it strictly raises val ``dsc_volume``. Returns (tta, post-processing, metrics.json entries)."""
        val = ValSplit(self.val_truth, self.val_patients, self.val_slices, self.class_names)
        flipped = self.predict_val(model, tta=True) if self.cfg.tta == "auto" else None
        return choose_inference(self.predict_val(model), flipped, val, postprocess=self.cfg.postprocess == "auto")

    def export_bundle(
        self, path: str | os.PathLike, name: str = "gliomaseg", extra_metrics: dict[str, Any] | None = None
    ) -> Path:
        """Write a bundle of the best epoch, with TTA and post-processing chosen on val (cfg.tta and
        cfg.postprocess 'auto'); ``extra_metrics`` (e.g. the tune trial id) go into its metrics.json too."""
        model = self.best_model()
        tta, settings, entries = self.choose_inference(model)
        config = make_bundle_config(
            self.cfg.to_dict(), in_channels=self.in_channels, class_names=self.class_names, image_size=self.image_size,
            postprocess=settings, tta=tta, split_hash=split_hash(self.split_info), name=name,
            preprocessing=self.preprocessing.to_config(), init=self.init,
        )
        if "val_one_slice" in entries:  # re-chosen and scored on the real one-slice path, not volume masks
            from core.inference.predictor import Predictor

            one = Predictor(Bundle(model=model, config=config, metrics={}, path=Path(path)), self.device)
            val = ValSplit(self.val_truth, self.val_patients, self.val_slices, self.class_names)
            area, entries["val_one_slice"] = choose_one_slice(one, self.val, val)
            config["postprocess"] = {**config["postprocess"], "min_area_slice_mm2": float(area)}
        metrics = {
            "epoch": self.best_epoch, "selection_metric": self.cfg.metric, "data_size": list(self.native_size),
            **entries, "epochs_trained": self.epoch, **(extra_metrics or {}),
        }
        return save_bundle(path, model, config, metrics)
