# make test: build .venv (once, and again when pyproject.toml or EXTRAS change), then run pytest.
# EXTRAS=test make test   installs no framework backend (NumPy only).
PYTHON ?= python3
EXTRAS ?= test,mlx,tinygrad
VENV := .venv
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: test venv clean

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -rfEs $(PYTEST_ARGS)

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
