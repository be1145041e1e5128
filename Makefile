# gliomaseg: `make demo` runs the whole pipeline on synthetic data; `make test` runs the suite.
# Both create .venv from nothing. Without a GPU the CPU build of torch is installed (the CUDA one is GBs).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_DIR ?= demo
STAMP := $(VENV)/.installed

export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled
export WANDB_MODE ?= disabled
export AWS_DEFAULT_REGION ?= us-east-1
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test lint browser clean gpu-campaign gpu-campaign-pack

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q "torch==$(TORCH_VERSION)"; \
	elif $(PIP) install -q --dry-run --no-index --no-deps "torch==$(TORCH_VERSION)" >/dev/null 2>&1; then \
		echo "no GPU: installing the local CPU build of torch $(TORCH_VERSION)"; \
		$(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else \
		echo "no GPU: installing the CPU build of torch $(TORCH_VERSION) from $(TORCH_CPU_INDEX)"; \
		$(PIP) install -q "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX) \
			--extra-index-url https://pypi.org/simple; \
	fi
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# Headless Chromium for the web-page tests (Debian package; tests skip with a reason when absent).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: browser tests will be skipped"; }

# The whole pipeline on the embedded default (synthetic data, local Ray, CPU): about 5 minutes on
# 2 cores. Everything it writes is under $(DEMO_DIR)/, which it replaces.
BEST := $(DEMO_DIR)/runs/demo/best
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) -m core data synth --out $(DEMO_DIR)/data --patients 12 --slices 24 --size 128 --seed 0
	$(PY) -m core data prepare --src $(DEMO_DIR)/data/kaggle_3m --out $(DEMO_DIR)/prepared --val 2 --test 2 \
		--no-progress
	$(PY) -m core data eda $(DEMO_DIR)/prepared
	$(PY) -m tune run --data $(DEMO_DIR)/prepared --name demo --storage $(DEMO_DIR)/runs --num-samples 8 \
		--max-epochs 6 --grace-period 2 --reduction-factor 2 --set arch=lite --set filters=8 \
		--set batch_size=16 --set oversample=0.5 --set 'lr={loguniform: [1.0e-4, 3.0e-2]}' --quiet
	$(PY) -m tune report $(DEMO_DIR)/runs/demo
	$(PY) -m core evaluate --bundle $(BEST) --data $(DEMO_DIR)/prepared --split test --out $(DEMO_DIR)/evaluate
	$(PY) -m serve.demo --bundle $(BEST) --data $(DEMO_DIR)/data/kaggle_3m --out $(DEMO_DIR)/serve
	$(PY) -m serve export-onnx --bundle $(BEST) --out $(DEMO_DIR)/export/model.onnx
	$(PY) -m serve export-sagemaker --bundle $(BEST) --out $(DEMO_DIR)/export/model.tar.gz
	@echo "demo done: report $(DEMO_DIR)/runs/demo/report/index.html, best bundle $(BEST)," \
		"served responses $(DEMO_DIR)/serve/, exports $(DEMO_DIR)/export/"

# Two workers, one module each at a time (module fixtures such as a Serve app start once): on one worker the
# suite keeps 0.7 of 2 cores busy, as most of its time goes to waiting for Ray, Serve and subprocesses to start.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The GPU campaign (bench/gpu_campaign.py, bench/README.md): the study's folds trained at full size on a lent
# GPU machine without Ray. Here: `make gpu-campaign-pack` writes $(GPU_CARRY) (the pool's patients, restore.py,
# folds.json, wheels). There, as the one command of a `run` call carrying $(GPU_CARRY): `make gpu-campaign`
# installs the wheels beside the image's torch and writes $(GPU_OUT) ($$OUT there).
GPU_CARRY ?= runs/gpu-carry
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/gpu-campaign-site
GPU_OUT ?= $(or $(OUT),runs/gpu-campaign-out)

gpu-campaign-pack: $(STAMP)
	$(PY) bench/gpu_campaign.py --make-pack $(GPU_CARRY)

gpu-campaign:
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) \
		$(GPU_CARRY)/wheels/*.whl
	PYTHONPATH=$(GPU_SITE) $(GPU_PYTHON) bench/gpu_campaign.py --carry $(GPU_CARRY) --out $(GPU_OUT)

clean:
	rm -rf $(DEMO_DIR) runs .pytest_cache
