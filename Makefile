# make test: build .venv (once, and again when pyproject.toml or EXTRAS change), then run pytest.
# EXTRAS=test make test   installs no framework backend (NumPy only).
PYTHON ?= python3
EXTRAS ?= test,mlx,tinygrad
VENV := .venv
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: test venv clean demo syscheck

# SYSCHECK=0 skips the preflight (the backends that need a missing library are then skipped)
SYSCHECK ?= 1
test: syscheck $(STAMP)
	$(VENV)/bin/python -m pytest -q -rfEs $(PYTEST_ARGS)

syscheck:
	@if [ "$(SYSCHECK)" != 0 ]; then $(PYTHON) scripts/check_system.py $(EXTRAS); fi

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml hatch_build.py | $(VENV)/bin/python
	$(VENV)/bin/pip install --disable-pip-version-check -q -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis dist build
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +

# make demo: the first thing to run. Builds .venv (MLX + matplotlib; the same stamp rule as
# above), trains a Mixture-of-Depths byte model for ~3 minutes on 2 CPU cores with a progress
# bar and evaluations in training and causal mode, then samples from its checkpoint (~5 min).
# On Linux with an NVIDIA GPU (nvidia-smi lists one) the demo installs MLX's CUDA build.
# Without a system OpenBLAS (Linux x86-64) it adds the `blas` extra: the mkl wheel, no root.
DEMO_EXTRAS ?= $(if $(shell nvidia-smi -L 2>/dev/null),cuda,mlx),plot$(shell $(PYTHON) scripts/check_system.py --blas-extra)
DEMO_OUT ?= runs/demo
DEMO_TRAIN ?= --config tiny-mod --steps 650 --batch-size 16 --lr 6e-3 --eval-every 130
demo:
	@$(MAKE) --no-print-directory venv EXTRAS=$(DEMO_EXTRAS)
	$(VENV)/bin/moe-min train $(DEMO_TRAIN) --out $(DEMO_OUT)
	$(VENV)/bin/moe-min generate --checkpoint $(DEMO_OUT)/checkpoint --max-tokens 400 \
		--prompt "The with statement" --temperature 0.8 --seed 0
	@echo "metrics: $(DEMO_OUT)/metrics.jsonl  plots: $(DEMO_OUT)/loss.png $(DEMO_OUT)/load.png"
