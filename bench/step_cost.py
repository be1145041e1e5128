"""What lowers a training step's cost on this machine (issue 19): the model step alone, batch on the device.

Variants of one step (same network, loss, AdamW, batch), interleaved round by round in one process so
load on a shared machine hits all alike, each reported as a ratio to the baseline of the same run:
- ``base``: fp32, contiguous tensors, all the threads given (``--threads``);
- ``channels_last``: the model and batch in NHWC memory format;
- ``compile``: ``torch.compile`` of the model (compile time reported apart from the steady state);
- ``bf16``: bf16 autocast (the loss in fp32), as on a GPU;
- ``one_thread``: one thread; two such trials side by side give ``2 * one_thread / base`` the
  throughput of one trial on both threads (what Ray Tune does with ``--cpus-per-trial 1``);
- the brain crop: with ``--prepared``, the brain's mean bounding box on those slices gives the
  uncropped size at which a model sees the brain as densely as a cropped ``--size`` model does; the
  step at that size (``uncropped_equivalent``) against the step at ``--size`` is what the crop saves.

    python bench/step_cost.py --prepared runs/lgg-prepared --threads 2     # CPU: unet f16 at 128 px
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import LoadSampler, add_threads_option, fmt, publish, resolve_threads, row, sync

from core.data.preprocessing import Preprocessing


def brain_fraction(prepared: Path, slices: int = 400) -> float:
    """Mean side of the per-patient brain box over the slice side, on up to ``slices`` train slices."""
    import numpy as np

    from core.data.arrays import load_split

    train = load_split(prepared, "train")
    sides = []
    for rows in train.patient_rows():
        if sum(len(s) for s in sides) >= slices:
            break
        _, boxes = Preprocessing(crop="patient").plan(np.asarray(train.images[np.sort(rows)]))
        sides.append(boxes[:, 2] / train.images.shape[2])
    return float(np.concatenate(sides).mean())


def make_step(args: argparse.Namespace, size: int, variant: str) -> tuple[Callable[[], None], float]:
    """A closure running one training step of ``variant`` at ``size`` px, and its set-up seconds."""
    import torch
    from monai.losses import DiceFocalLoss

    from core.networks.models import build_model

    torch.manual_seed(args.seed)
    model = build_model(args.arch, 3, 1, args.filters, 0.0)
    x = torch.randn(args.batch, 3, size, size)
    y = (torch.rand(args.batch, 1, size, size) > 0.9).float()
    if variant == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    loss_fn = DiceFocalLoss(sigmoid=True, batch=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    net = torch.compile(model) if variant == "compile" else model

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    t0 = time.perf_counter()
    step()  # the first step builds (or compiles) everything
    return step, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    threads = resolve_threads(args) or torch.get_num_threads()
    fraction = brain_fraction(args.prepared) if args.prepared else None
    equivalent = None if fraction is None else int(round(args.size / fraction / 32)) * 32
    variants = {name: (args.size, name) for name in ("base", "channels_last", "bf16", "one_thread")}
    if not args.no_compile:
        variants["compile"] = (args.size, "compile")
    if equivalent and equivalent != args.size:
        variants["uncropped_equivalent"] = (equivalent, "base")
    steps, setup = {}, {}
    for name, (size, variant) in variants.items():
        torch.set_num_threads(1 if name == "one_thread" else threads)
        steps[name], setup[name] = make_step(args, size, variant)
    times: dict[str, list[float]] = {name: [] for name in steps}
    load = LoadSampler()
    for r in range(args.rounds):
        for name, step in steps.items():
            torch.set_num_threads(1 if name == "one_thread" else threads)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                sync(torch.device("cpu"))
                times[name].append(time.perf_counter() - t0)
        load.mark(f"round {r + 1}")
    median = {name: statistics.median(t) for name, t in times.items()}
    speedup = {name: median["base"] / m for name, m in median.items()}
    figures = {name: {"median_step_s": median[name], "speedup_vs_base": speedup[name], "setup_s": setup[name],
                      "steps": len(times[name])} for name in steps}
    summary = [row(f"step cost, {name} vs base", "> 1x pays", f"{fmt(speedup[name])}x "
                   f"({fmt(median[name])} s vs {fmt(median['base'])} s a step; set-up {fmt(setup[name], 1)} s)",
                   None, "model step alone, batch on the device") for name in steps if name != "base"]
    two_trials = 2 * speedup["one_thread"]
    summary.append(row("throughput, two 1-thread trials vs one 2-thread trial", "> 1x pays", f"{fmt(two_trials)}x",
                       None, "two trials side by side on the two cores, as tune runs them"))
    if equivalent:
        summary.append(row("brain crop: step at the uncropped size of equal brain resolution", "> 1x pays",
                           f"{fmt(median.get('uncropped_equivalent', median['base']) / median['base'])}x "
                           f"({equivalent} px uncropped = {args.size} px cropped; brain box "
                           f"{fmt(fraction)} of the slice side)", None, "the same brain pixels per model pixel"))
    return {"settings": {**vars(args), "prepared": str(args.prepared) if args.prepared else None,
                         "threads": threads, "brain_box_fraction": fraction, "uncropped_equivalent": equivalent},
            "figures": figures, "two_one_thread_trials_vs_one": two_trials, "load": load.summary(),
            "summary": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="unet")
    p.add_argument("--filters", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prepared", type=Path, help="a prepared directory: measure what the brain crop saves there")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it compiles for minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu",), help="a CPU benchmark: what a CPU step costs")
    add_threads_option(p, "torch threads of every variant but one_thread")
    args = p.parse_args()
    publish("step-cost", run(args))


if __name__ == "__main__":
    main()
