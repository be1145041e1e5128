"""MODEL_CARD.md of a model shipped by bench/honest_study.py: test figures first, then how it was made."""

from __future__ import annotations

import json
from typing import Any

PATHS = (("whole volumes (`/v1/segment/volume`, `core predict`)", "volume"),
         ("one slice at a time (`/v1/segment`)", "one_slice"),
         ("pre- and post-contrast replaced by FLAIR (volumes)", "flair_only"))


def _interval(s: dict[str, Any]) -> str:
    return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


def model_card(result: dict[str, Any], info: dict[str, Any]) -> str:
    test, chosen = result["test"], result["chosen"]
    rows = []
    for label, key in PATHS:
        s, m = test["per_patient"][key], test["metrics"][key]
        rows.append(f"| {label} | {_interval(s)} | {s['worst']:.3f} ({s['worst_patient']}) | "
                    f"{m['dice_tumour']:.3f} | {m['fp_slice_rate']:.3f} |")
    cv = chosen["cv"]["per_patient"]
    quality = chosen["quality"]
    hp = {k: v for k, v in result["config"].items() if k not in ("device", "workers", "eval_batch_size")}
    route = chosen.get("flair_route")
    flair_hp = result.get("flair_config") or {}
    differ = ", ".join(f"`{k}: {flair_hp[k]}`" for k in sorted(flair_hp) if flair_hp[k] != result["config"].get(k))
    route_text = ""
    if route:
        route_text = (f" The FLAIR-only members' own out-of-fold figures (the route those inputs take), with that "
                      f"route's volume rules `{json.dumps(route['postprocess'])}` chosen on them: drop "
                      f"{_interval(route['flair_only_drop'])}.")
    flair_limit = ""
    if route:
        f = test["per_patient"]["flair_only"]
        flair_limit = (f"\n- Scans without pre- and post-contrast take the FLAIR-only route: on the test split\n"
                       f"  it drops per-patient dsc_volume by {_interval(test['flair_only_drop'])} (worst patient "
                       f"{f['worst']:.3f}, {f['worst_patient']}).")
    return CARD.format(
        flair_limit=flair_limit, ships=ROUTED.format(differ=differ or "`sequences: flair`") if route else PLAIN,
        note=f"\n{result['note']}\n" if result.get("note") else "", route=route_text,
        pool=result["split"]["pool"], test_n=len(result["split"]["test"]), test_ids=", ".join(result["split"]["test"]),
        split=result["split"]["hash"], rows="\n".join(rows), drop=_interval(test["flair_only_drop"]),
        rho_test=test["quality"]["spearman"], cv_volume=_interval(cv["volume"]), cv_worst=cv["volume"]["worst"],
        cv_slice=_interval(cv["one_slice"]), cv_drop=_interval(cv["flair_only_drop"]),
        method=quality["method"], rho_cv=quality["spearman_cv"], review=quality["review_below"],
        review_dice=quality["review_dice"], tta=chosen["tta"], pp=json.dumps(chosen["postprocess"]),
        hp=json.dumps(hp, indent=1, sort_keys=True), cpu_hours=result["cv_cpu_hours"],
        epochs=result["config"].get("epochs"),
    )


PLAIN = """The 5-fold cross-validation ensemble (probabilities of the five fold models averaged; fp16 weights, the
very files the test figures were measured with), decided on before the test split was read."""
ROUTED = """A routed ensemble of the 5-fold cross-validation models (fp16 weights, the very files the test figures
were measured with): five full models, each trained on all three channels, and five FLAIR-only models, each
trained with FLAIR in every channel on the same folds. A slice whose pre- and post-contrast channels are
exact copies of FLAIR (a scan without them, filled the way the Kaggle set fills a missing sequence) goes
to the FLAIR-only models; every other slice to the full ones. Each group's probabilities are averaged.
The FLAIR-only models share the hyperparameters below except {differ}."""

CARD = """# gliomaseg LGG FLAIR-abnormality segmentation model (`pretrained/lgg`)

**Intended use: research and software development only. Not a medical device; not for diagnosis or
treatment decisions.** It segments FLAIR abnormality in axial brain MRI of lower-grade glioma patients:
3 channels (pre-contrast, FLAIR, post-contrast), uint8, any size (resized to the model's 128 px input and
back), standardised and cropped as config.json's `normalisation` and `crop` say (per patient: send whole
volumes). Every volume answer carries `quality` (0-1) and `review`.

## Test split (nothing was chosen on it)
{note}
{test_n} patients fixed before any choice of this study (`bench/results/real-lgg-test-split.json`,
seed 2026, split hash `{split}`): {test_ids}. dsc_volume is the 3D Dice per patient (Buda et al.), mean
with a 95% bootstrap interval over patients; dice_tumour and fp_slice_rate over the split's slices.

| path | dsc_volume [95% CI] | worst patient | dice_tumour | fp_slice_rate |
| --- | --- | --- | --- | --- |
{rows}

FLAIR-only drop per patient (intact minus pre/post replaced by FLAIR): {drop}. Spearman correlation of
`quality` with per-patient dsc_volume on the test split: {rho_test:.3f}.

Caveat: the training recipe below (architecture and hyperparameters) comes from earlier studies of this
project (bench/results/real-lgg-cpu.json, real-lgg-ms50-cpu.json) on a different split, in which some
of these test patients were trained on and two (TCGA_HT_7605, TCGA_HT_8107) were among the 11 that
selected the recipe. Everything this study chose (TTA, post-processing, the quality method and its
review cut, the shipped form) was chosen by cross-validation without the test split.

## What ships
{ships}

## How it was made
Data: Kaggle `lgg-mri-segmentation` (Buda, Saha, Mazurowski 2019; images from TCIA, TCGA-LGG), licence
CC BY-NC-SA 4.0: these weights are derived from it and inherit the non-commercial, share-alike terms.
99 patients in the project's copy; 11 more were held back by the project and never seen here.

- `tune cv`: 5 patient-level folds of the {pool} pool patients, each fold model trained {epochs} epochs on
  the other four folds ({cpu_hours} CPU-hours on 2 CPU cores, no GPU).
- Out-of-fold (each pool patient predicted by the fold model that never saw it), chosen there: TTA
  `{tta}`; post-processing `{pp}` (mm3 and mm2 at each scan's own spacing; components whose mean
  probability is below `min_probability` are dropped); quality method `{method}` (Spearman with
  per-patient dsc_volume {rho_cv:.3f} on CV), "review" below {review} (the cut that best separates
  patients under dsc_volume {review_dice}).
- CV figures (out-of-fold, on the predictions these settings were chosen on, so mildly optimistic):
  dsc_volume {cv_volume} (worst patient {cv_worst:.3f}); one slice at a time {cv_slice}; the full models'
  FLAIR-only drop {cv_drop}.{route}

Command: `python bench/honest_study.py` (its docstring); record `bench/results/real-lgg-honest-cpu.json`.

Hyperparameters of each fold model:
```json
{hp}
```

## Limits
- Trained on 2D axial slices of one public collection (TCGA-LGG, 8-bit Kaggle slices); scanners,
  protocols and diseases outside it (high-grade glioma, the BraTS whole-tumour label) are not covered.
- On scans outside the collection the project measured false regions in faint-FLAIR tissue (temporal
  lobe, posterior fossa, insula); the component probability rule and `quality` are there to catch
  them, not a guarantee. Read `review` answers with care.{flair_limit}
"""
