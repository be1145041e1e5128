"""How a bundle holds up when pre- or post-contrast is missing (issue 19): val dsc_volume intact, with
the val patients' pre- and post-contrast replaced by FLAIR (as the Kaggle set fills a missing
sequence), and on the val patients whose sequences are missing already.

    python bench/missing_sequences.py --bundle pretrained/lgg --data runs/lgg-prepared

Prints and returns the figures; `bench/real_lgg.py` records them for the model it ships. The target:
a drop of at most 0.03 dsc_volume against the intact data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.data.arrays import SplitArrays, load_split  # noqa: E402
from core.evaluation.evaluate import predict_split  # noqa: E402
from core.evaluation.metrics import per_patient_dice, segmentation_metrics  # noqa: E402

FLAIR = 1
MAX_DROP = 0.03


def missing_patients(arrays: SplitArrays) -> dict[str, list[str]]:
    """Patients whose pre- (channel 0) or post-contrast (channel 2) equals FLAIR on every slice."""
    out: dict[str, list[str]] = {}
    for rows in arrays.patient_rows():
        images = np.asarray(arrays.images[np.sort(rows)])
        missing = [name for ch, name in ((0, "pre-contrast"), (2, "post-contrast"))
                   if np.array_equal(images[:, ch], images[:, FLAIR])]
        if missing:
            out[str(arrays.patients[rows[0]])] = missing
    return out


def with_flair_for(arrays: SplitArrays, channels: tuple[int, ...] = (0, 2)) -> SplitArrays:
    """A copy of the split whose ``channels`` are FLAIR's pixels."""
    images = np.array(arrays.images, copy=True)
    for ch in channels:
        images[:, ch] = images[:, FLAIR]
    return SplitArrays(images, np.asarray(arrays.masks), np.asarray(arrays.patients), np.asarray(arrays.slices))


def missing_sequence_check(bundle: str | Path, prepared: str | Path, device: str = "cpu") -> dict[str, Any]:
    from core.inference.predictor import Predictor

    predictor = Predictor.from_bundle(bundle, device)
    val = load_split(prepared, "val")
    truth, patients = np.asarray(val.masks), np.asarray(val.patients).astype(str)
    out: dict[str, Any] = {"bundle": str(bundle), "missing_in_val": missing_patients(val)}
    for name, arrays in (("intact", val), ("pre_post_as_flair", with_flair_for(val))):
        pred = predict_split(predictor, arrays)
        out[name] = {**segmentation_metrics(pred, truth, patients),
                     "per_patient": per_patient_dice(pred, truth, patients)}
    drop = out["intact"]["dsc_volume"] - out["pre_post_as_flair"]["dsc_volume"]
    missing = sorted(out["missing_in_val"])
    out["drop"] = drop
    out["missing_patients_dsc_volume"] = {p: out["intact"]["per_patient"][p] for p in missing}
    out["met"] = drop <= MAX_DROP
    out["selection"] = "val patients; the bundle was selected on them"
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, type=Path, help="prepared directory (its val split)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    out = missing_sequence_check(args.bundle, args.data, args.device)
    print(json.dumps({k: v for k, v in out.items() if k not in ("intact", "pre_post_as_flair")}, indent=1))
    print(f"val dsc_volume intact {out['intact']['dsc_volume']:.4f}, pre/post as FLAIR "
          f"{out['pre_post_as_flair']['dsc_volume']:.4f}: drop {out['drop']:.4f} (target <= {MAX_DROP})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
