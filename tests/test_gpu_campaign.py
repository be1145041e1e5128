"""bench/gpu_campaign.py's CPU smoke: the GPU campaign's path end to end (a small pack of pool patients
restored and prepared, every fold trained in its own spawned process, fp16 bundles zipped, timing.json), then
``--unpack``'s layout for `tune study --folds-from`. The child runs with its imports limited to what the GPU
machine has (Ray and core's other extras blocked), so a Ray import anywhere in the path fails it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
from tune_support import ROOT, driver_env

SCRIPT = ROOT / "bench" / "gpu_campaign.py"
REAL_DATA = ROOT.parent / "shared" / "data" / "lgg"  # as tests/conftest.py and gpu_campaign find it
TEST_SPLIT = ROOT / "bench" / "results" / "real-lgg-test-split.json"
# Packages the GPU image lacks (device KINDS.md) that core or MONAI could reach for; monai and nibabel travel
# as wheels, and imagecodecs stands in here for the carried pillow-jxl-plugin.
BLOCKED = ("ray", "pydicom", "highdicom", "boto3", "botocore", "s3transfer", "optuna", "wandb", "kagglehub", "moto",
           "tensorboardX")
BLOCKER = f'''import sys

class _NotOnTheGpuMachine:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {set(BLOCKED)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)", name=name)
        return None

sys.meta_path.insert(0, _NotOnTheGpuMachine())
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The repo importable, and a sitecustomize (inherited by spawned fold processes) blocking BLOCKED."""
    site = tmp_path_factory.mktemp("gpu_site")
    (site / "sitecustomize.py").write_text(BLOCKER)
    out = driver_env(None)
    out["PYTHONPATH"] = str(site) + os.pathsep + out["PYTHONPATH"]
    return out


def campaign(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, env) -> dict:
    base = tmp_path_factory.mktemp("gpu_campaign")
    out, work, unpacked = base / "out", base / "work", base / "unpacked"
    t0 = time.perf_counter()
    campaign(env, "--smoke", "--out", str(out), "--work", str(work))
    seconds = time.perf_counter() - t0
    campaign(env, "--unpack", str(out), "--out", str(unpacked), timeout=120)
    return {"out": out, "work": work, "unpacked": unpacked, "seconds": seconds,
            "timing": json.loads((out / "timing.json").read_text()),
            "folds": json.loads((out / "folds.json").read_text())["folds"]}


def split_hash(fold: list[str], folds: list[list[str]]) -> str:
    sys.path.insert(0, str(ROOT))
    from core.data.arrays import split_hash as core_split_hash

    train = sorted(p for f in folds if f != fold for p in f)
    return core_split_hash({"patients": {"train": train, "val": list(fold), "test": []}})


@pytest.mark.slow
def test_smoke_brings_back_fp16_fold_bundles_trained_on_their_complements(smoke):
    from safetensors.torch import load_file

    from core.bundle import load_bundle

    folds, out, unpacked = smoke["folds"], smoke["out"], smoke["unpacked"]
    assert len(folds) == 2 and sorted(p.name for p in out.iterdir()) == ["fold0.zip", "fold1.zip", "folds.json",
                                                                         "timing.json"]
    assert all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())  # what one `run` call brings back
    assert json.loads((unpacked / "folds.json").read_text())["folds"] == folds
    assert (unpacked / "timing.json").read_bytes() == (out / "timing.json").read_bytes()
    for k, fold in enumerate(folds):
        bundle = load_bundle(unpacked / f"fold{k}")  # checks every file's sha256
        assert sorted(p.name for p in (unpacked / f"fold{k}").iterdir()) == ["config.json", "metrics.json",
                                                                            "model.safetensors"]
        assert bundle.config["weights_dtype"] == "float16"
        weights = load_file(str(unpacked / f"fold{k}" / "model.safetensors"))
        assert {str(t.dtype) for t in weights.values() if t.is_floating_point()} == {"torch.float16"}
        complement = sorted(p for f in folds if f is not fold for p in f)
        assert bundle.metrics["train_patients"] == complement and bundle.metrics["val_patients"] == fold
        assert bundle.metrics["fold"] == k and bundle.metrics["stop_reason"] == "completed"
        assert bundle.config["data"]["split_hash"] == split_hash(fold, folds)  # as tune.cv's fold bundles record it
        assert bundle.config["hyperparameters"]["keep"] == "last" and bundle.config["tta"] == "none"
        assert bundle.metrics["epochs_trained"] == smoke["timing"]["config"]["epochs"]


@pytest.mark.slow
def test_smoke_timing_has_the_figures_and_no_ray(smoke):
    timing = smoke["timing"]
    print(f"gpu_campaign --smoke: {smoke['seconds']:.0f} s")
    assert smoke["seconds"] < 180 and timing["total_wall_s"] <= timing["budget_s"]
    assert timing["ray_imported"] is False and timing["complete"] is True and timing["smoke"] is True
    assert {"device", "torch", "monai", "python", "cpu_count", "config", "samples_per_s", "training_wall_s",
            "campaign_cpu_seconds"} <= set(timing)
    assert timing["device"] == "cpu" and timing["samples_per_s"] > 0
    cfg = timing["config"]
    assert (cfg["keep"], cfg["patience"], cfg["amp"], cfg["device"]) == ("last", 0, True, "cpu")
    for k, fold in enumerate(timing["folds"]):
        assert fold["fold"] == k and fold["exit_code"] == 0 and fold["ray_imported"] is False
        assert fold["epochs"] == cfg["epochs"] == len(fold["history"]) and fold["stop_reason"] == "completed"
        assert fold["wall_seconds"] > 0 and fold["process_cpu_seconds"] >= fold["epoch_cpu_seconds"] > 0
        assert fold["train_samples_per_s"] > 0 and fold["peak_memory"]["host_rss_mib"] > 0
    compute = timing["compute"]
    assert compute["epochs"] == 2 * cfg["epochs"]
    assert compute["training_process_cpu_seconds"] == pytest.approx(
        sum(f["process_cpu_seconds"] for f in timing["folds"]), abs=0.1)
    assert set(timing["returned"]["files"]) == {"fold0.zip", "fold1.zip"}


@pytest.mark.slow
def test_smoke_pack_holds_pool_patients_only(smoke):
    if not (REAL_DATA / "lossless.zip").is_file():
        pytest.skip("no real data here: the smoke synthesised its patients")
    pack = json.loads((smoke["work"] / "carry" / "pack.json").read_text())
    test = set(json.loads(TEST_SPLIT.read_text())["patients"]["test"])
    assert len(pack["pool"]) == 4 and not test & set(pack["pool"]) and set(pack["left_out"]) == test
    assert sorted(p for f in smoke["folds"] for p in f) == pack["pool"] and smoke["timing"]["data"]["patients"] == 4
    with zipfile.ZipFile(smoke["work"] / "carry" / "gpu-pack.zip") as zf:
        assert {n.split("/")[0].rsplit("_", 1)[0] for n in zf.namelist()} == set(pack["pool"])


@pytest.mark.slow
def test_budget_shortens_the_schedule_and_writes_what_exists(smoke, env, tmp_path):
    out = tmp_path / "out"
    # 500 epochs cannot fit 120 s (fold processes take up to ~40 s to start on a loaded 2-core machine)
    campaign(env, "--smoke", "--out", str(out), "--work", str(smoke["work"]), "--set", "epochs=500",
             "--budget", "120")
    timing = json.loads((out / "timing.json").read_text())
    assert timing["complete"] is False and timing["total_wall_s"] <= 120
    for k, fold in enumerate(timing["folds"]):
        assert fold["epochs_planned"] == 500 and 3 <= fold["epochs"] <= fold["epochs_scheduled"] < 500
        # shortened once after 3 epochs: the cosine schedule ends within the budget (a later stop is "budget")
        assert fold["stop_reason"] == ("completed" if fold["epochs"] == fold["epochs_scheduled"] else "budget")
        if fold["stop_reason"] == "completed":  # its weights are annealed: the learning rate ran down to ~0
            assert fold["history"][-1]["lr"] < 0.05 * fold["history"][0]["lr"]
        with zipfile.ZipFile(out / f"fold{k}.zip") as zf:
            metrics = json.loads(zf.read(f"fold{k}/metrics.json"))
            config = json.loads(zf.read(f"fold{k}/config.json"))
        assert metrics["epochs_trained"] == fold["epochs"] and metrics["epochs_planned"] == 500
        assert config["hyperparameters"]["epochs"] == fold["epochs_scheduled"]


@pytest.mark.slow
def test_unpack_refuses_a_missing_or_altered_fold(smoke, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))  # gpu_campaign runs as a script: its siblings import by name
    from bench.gpu_campaign import unpack

    back = tmp_path / "back"
    shutil.copytree(smoke["out"], back)
    (back / "fold1.zip").unlink()
    with pytest.raises(SystemExit, match="fold 1 did not finish"):
        unpack(back, tmp_path / "a")
    with zipfile.ZipFile(back / "fold1.zip", "w") as zf, zipfile.ZipFile(smoke["out"] / "fold1.zip") as good:
        for name in good.namelist():
            zf.writestr(name, good.read(name))
        zf.writestr("../outside.txt", "x")
    with pytest.raises(SystemExit, match="expected exactly"):
        unpack(back, tmp_path / "b")
    assert not (tmp_path / "outside.txt").exists()


def test_gpu_defaults_are_the_study_at_full_size_and_fit_what_comes_back(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from bench.gpu_campaign import campaign_config, check_return_size, parse

    args = parse(["--carry", str(tmp_path), "--out", str(tmp_path / "out")])
    cfg = campaign_config(args)
    assert (cfg.arch, cfg.filters, cfg.image_size, cfg.device, cfg.amp) == ("unet", 32, 256, "cuda", True)
    assert cfg.epochs >= 50 and (cfg.keep, cfg.patience, cfg.tta, cfg.postprocess) == ("last", 0, "none", "none")
    assert args.budget <= 540 and args.folds_file is None  # no folds.json carried: folds made there
    sizes = check_return_size(cfg, 5)  # five fp16 U-Net 32 bundles, one zip each, beside two JSON files
    assert 12 < sizes["fold_zip_mib_estimate"] < 16
    with pytest.raises(SystemExit, match="cannot come back"):
        check_return_size(cfg, 7)
