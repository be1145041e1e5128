"""The model card of the shipped LGG model (MODEL_CARD.md), from bench/real_lgg.py's results."""

from __future__ import annotations

import json
from typing import Any


def model_card(results: dict[str, Any], shipped: dict[str, Any], info: dict[str, Any]) -> str:
    """MODEL_CARD.md: data and licence, split, how the hyperparameters were found, val metrics, limits."""
    rows = []
    for label, key in (("raw (no TTA, no post-processing)", "val_raw"),
                       ("with post-processing", "val_postprocessed"),
                       ("with flip TTA (+ its post-processing)", "val_tta"), ("shipped (as configured)", "val")):
        m = shipped.get(key)
        if m:
            rows.append(f"| {label} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in CARD_METRICS) + " |")
    hp = {k: v for k, v in shipped["config"].items() if k not in ("device", "workers", "eval_batch_size")}
    search = results["search"]
    return MODEL_CARD.format(
        train=info["counts"]["train"]["patients"], train_slices=info["counts"]["train"]["slices"],
        val=info["counts"]["val"]["patients"], val_slices=info["counts"]["val"]["slices"],
        val_ids=", ".join(info["patients"]["val"]), split=results["split"]["hash"],
        trials=sum(1 for t in results["trials"] if t["epochs_run"]), trial_epochs=search["trial_epochs"],
        search_hours=search["cpu_hours"],
        final=results.get("final_note", "none"), total_hours=results["cpu_hours"], machine=results["machine_note"],
        source=shipped["source"], hp=json.dumps(hp, indent=1, sort_keys=True),
        header=" | ".join(CARD_METRICS), rule=" | ".join("---" for _ in CARD_METRICS), rows="\n".join(rows),
        tta=shipped.get("tta", "none"), pp=json.dumps(shipped.get("postprocess", {})),
        image_size=shipped["config"].get("image_size") or 256, extra=extra_lines(results),
    )


def extra_lines(results: dict[str, Any]) -> str:
    """The ensemble and cross-validation figures, where they were run."""
    lines = []
    if results.get("ensemble"):
        e = results["ensemble"]
        lines.append(f"The ensemble of the search's {e['ensemble']['top']} best trials reached val dsc_volume "
                     f"{e['ensemble']['val']['dsc_volume']:.4f} against {e['best_single']['val']['dsc_volume']:.4f} "
                     "for the best single trial (members and settings selected on val).")
    if results.get("cv"):
        cv, k = results["cv"]["summary"], len(results["cv"]["folds"])
        pool = results["cv"].get("pool", "train+val")
        patients = results["split"]["counts"]["train"]["patients"] + (
            results["split"]["counts"]["val"]["patients"] if pool == "train+val" else 0)
        worst = cv.get("worst_patient_dsc_volume")
        lines.append(f"{k}-fold patient-level cross-validation of the winning configuration "
                     f"({results['cv']['config']['epochs']} epochs a fold, {patients} patients, {pool}): dsc_volume "
                     f"{cv['dsc_volume']['mean']:.4f} +- {cv['dsc_volume']['sd']:.4f}"
                     + (f" (worst patient {worst:.4f})" if worst is not None else "") + ", dice_tumour "
                     f"{cv['dice_tumour']['mean']:.4f} +- {cv['dice_tumour']['sd']:.4f}, fp_slice_rate "
                     f"{cv['fp_slice_rate']['mean']:.4f} +- {cv['fp_slice_rate']['sd']:.4f} (each fold scored on "
                     "patients it never trained on).")
        if results["cv"].get("ensemble_val"):
            lines.append(f"The fold ensemble on val (no fold saw those patients; its settings chosen there): "
                         f"dsc_volume {results['cv']['ensemble_val']['dsc_volume']:.4f}.")
    if results.get("finetune"):
        f = results["finetune"]
        lines.append(f"{f['source'].capitalize()}: val dsc_volume {f['val']['dsc_volume']:.4f} "
                     f"(worst patient {f['val']['dsc_volume_min']:.4f}), best of {len(f['epoch_seconds'])} epochs.")
    if results.get("shipped_paths"):
        paths = results["shipped_paths"]
        worst = sorted(paths["volume_per_patient"].items(), key=lambda kv: kv[1])[:3]
        lines.append(f"Val one slice at a time (per-slice standardisation and crop, the slice rule of "
                     f"post-processing; as `/v1/segment` and SageMaker per slice see it): dsc_volume "
                     f"{paths['one_slice']['dsc_volume']:.4f}, dice_tumour {paths['one_slice']['dice_tumour']:.4f}, "
                     f"fp_slice_rate {paths['one_slice']['fp_slice_rate']:.4f}; whole volumes: dsc_volume "
                     f"{paths['volume']['dsc_volume']:.4f}. The three worst val patients (volumes): "
                     + ", ".join(f"{p} {d:.3f}" for p, d in worst) + ".")
    if results.get("versus") and results["versus"]["ours"]:
        v = results["versus"]
        lines.append(f"The configuration is the search's winner with {json.dumps(results.get('variant', {}))}: "
                     f"its CV dsc_volume {v['ours']['dsc_volume']:.4f} "
                     f"(worst patient {v['ours']['worst_patient']:.4f}) "
                     f"against {v['theirs']['dsc_volume']:.4f} (worst {v['theirs']['worst_patient']:.4f}) for the "
                     f"winner as searched, on the same folds ({v['record']}).")
    if results.get("missing_sequences"):
        m = results["missing_sequences"]
        lines.append(f"Missing sequences (val): dsc_volume {m['intact']['dsc_volume']:.4f} intact, "
                     f"{m['pre_post_as_flair']['dsc_volume']:.4f} with every patient's pre- and post-contrast "
                     f"replaced by FLAIR (drop {m['drop']:.4f}; target <= 0.03); val patients already missing one: "
                     + (", ".join(f"{p} {d:.3f}" for p, d in m["missing_patients_dsc_volume"].items()) or "none")
                     + ".")
    return "\n".join(lines) + ("\n" if lines else "")


CARD_METRICS = ("dsc_volume", "dsc_volume_min", "dice_tumour", "dice_all", "iou", "fp_slice_rate")
MODEL_CARD = """# gliomaseg LGG FLAIR-abnormality segmentation model (`pretrained/lgg`)

**Intended use: research and software development only. Not a medical device; not for diagnosis or
treatment decisions.** It segments FLAIR abnormality in axial brain MRI slices of lower-grade glioma
patients: 3 channels (pre-contrast, FLAIR, post-contrast), uint8, any size (resized to the model's
{image_size} px input and back), standardised and cropped as config.json's `normalisation` and `crop` say
(per patient: send whole volumes for its own masks).

## Data and licence
Kaggle `lgg-mri-segmentation` (Buda, Saha, Mazurowski 2019; images from TCIA, TCGA-LGG), licence
CC BY-NC-SA 4.0: these weights are derived from it and inherit the non-commercial, share-alike terms.
Trained on {train} patients ({train_slices} slices); validated on {val} patients ({val_slices} slices):
{val_ids}. Patient-level split, seed 0, tumour-slice share balanced (split hash `{split}`,
`bench/results/real-lgg-split.json`). 11 of the 110 Kaggle patients were held back by the project for
independent evaluation and were never seen here.

## How it was made
`python bench/real_lgg.py` (see the README's "Real-data results"): a Ray Tune search (Optuna TPE +
ASHA, `bench/real_lgg_space.yaml`) of {trials} trials run ({trial_epochs} trial-epochs, {search_hours:.2f}
CPU-hours), then the final run: {final}. Total {total_hours:.2f} CPU-hours on {machine}. Shipped: {source}.
{extra}
Hyperparameters:
```json
{hp}
```

## Validation metrics
On the 11 validation patients at their own 256 px resolution. The model, its epoch, its TTA and its
post-processing were all selected on this split, so these figures are optimistic.

| | {header} |
| --- | {rule} |
{rows}

Test-time augmentation: `{tta}`; post-processing: `{pp}` (each kept only where it raised val
dsc_volume). `dsc_volume` is the 3D Dice per patient averaged over patients (Buda et al. report 82%
in cross-validation; two expert readers agree at 84%); `dice_tumour` is the mean slice Dice over
tumour slices (the earlier study's 0.839 figure); `fp_slice_rate` is the share of tumour-free slices
with any predicted tumour pixel.

## Known limits
- Trained on CPU within a small budget at reduced resolution; a GPU search would do better.
- One public collection (TCGA-LGG from a few institutions, as published on Kaggle); not validated on
  other scanners, sequences, pre-processing, paediatric or high-grade tumours.
- 11 validation patients are a small sample, and they also selected the model; expect lower figures
  on new patients.
- A `patient` bundle standardises over the whole volume: send volumes (`/v1/segment/volume`, `core
  predict`, `serve batch`) for the masks it was validated with; one slice alone is standardised by
  itself (the response says so) and gets the slice rule of post-processing.
- Weights are stored in fp16 (evaluated in fp32 after loading).
"""
