# Patch-Adapter: set-up, tests and benchmarks. Everything runs offline on the CPU.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: setup browser lint test test-all bench bench-sdxl bench-train train-tiny tiny-competence retrain-rpa quality clean

# .venv with torch (CPU wheel, pinned by constraints.txt), the package and its test tools,
# and the browser the web app's test drives
setup:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	$(MAKE) --no-print-directory browser

# Debian's chromium for tests/test_web_browser.py (Playwright drives it; its own browser
# downloads are not used): installed with apt-get when missing and we are root
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (apt-get) for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "note: the browser test needs chromium: sudo apt-get install chromium (it fails under CI=true)"; fi

# ruff (pyproject.toml [tool.ruff]): pyflakes, pycodestyle errors, import order, bugbear; and its formatter
lint:
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

# the suite on the tiny backbone, two processes (about 8 minutes on 2 cores; the quality slice
# takes the most), after `make lint`; tests marked slow are left out, `make test-all` runs them (the direct baseline at 4K)
test: lint
	$(PY) -m pytest -q -n 2 -m "not slow"

test-all:
	$(PY) -m pytest -q -n 2

# the scaling table: time and memory per image size and mask area, plus SDXL TFLOPs
bench:
	$(PY) benchmarks/scaling.py

# SDXL-size inference on a CUDA GPU (random weights): seconds per stage, peak memory, TFLOP/s;
# without a GPU, `$(PY) benchmarks/sdxl_inference.py --estimate-only` prints the memory estimates
bench-sdxl:
	$(PY) benchmarks/sdxl_inference.py

# steps/s and peak memory of both training stages on the tiny backbone
bench-train:
	$(PY) benchmarks/train_speed.py

# train the tiny world's backbone (VAE, text encoders, UNet) and both adapters from scratch, in
# stages that each write their result into src/patch_adapter/tiny_world/stages (committed), the
# last one into src/patch_adapter/tiny_world/weights; a finished stage is skipped, so a rerun
# continues. `make train-tiny STAGE=vae` (or decoder, denoiser, adapters) runs one stage (each at most
# 90 minutes on 2 cores; the denoiser stage adds one round per run); DEVICE=cuda trains on a GPU;
# docs/tiny-world.md
train-tiny:
	$(PY) -m patch_adapter.tiny_world.recipe --work build/tiny $(if $(STAGE),--stage $(STAGE),) $(if $(DEVICE),--device $(DEVICE),)

# the shipped backbone's competence at native size: VAE texture kept, inserts read back
tiny-competence:
	$(PY) -m patch_adapter.tiny_world.competence

# train only the Reference Patch Adapter again on the shipped backbone (after a change of its design;
# 8.4 minutes on 2 cores in session 12), keeping the shipped Dual Context Adapter; it replaces the shipped
# adapter file and stages/adapters
retrain-rpa:
	$(PY) -m patch_adapter.tiny_world.recipe --work build/tiny-rpa --retrain rpa --threads 1

# the quality tables (README): every method and ablation on 200 tasks at 4x and 8x native
# (measured on 2 cores with the f4 backbone: 36 minutes at 512x512; at 1024x1024 36 minutes without direct,
# which takes 41 s a task, so about 105 minutes with it on all 200: README's table ran it on the first 24,
# with --methods direct --count 24, then --summarize-only with --count 200 for the table of all of them)
quality:
	$(PY) benchmarks/quality.py --seed 0 --count 200 --size 512x512 --steps 10 --workers 2 --json build/quality/q512.json
	$(PY) benchmarks/quality.py --seed 0 --count 200 --size 1024x1024 --steps 10 --workers 2 --json build/quality/q1024.json

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
