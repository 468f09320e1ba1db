# Two commands set up everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: venv demo test test-slow bench clean

venv: $(INSTALLED)

# torch first, pinned to the CPU wheel on disk, so that resolving the package's
# dependencies never pulls a multi-GB CUDA build.
$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test]"
	touch $(INSTALLED)

# $(value ARGS): make leaves ${...} in the overrides alone (Hydra interpolations), e.g.
# make demo ARGS="'trainer.max_steps=\${data.batch_size}' '~trainer.logger' strategy=dp"
demo: $(INSTALLED)
	$(PYTHON) examples/train.py $(value ARGS)

test: $(INSTALLED)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-slow: $(INSTALLED)
	$(PYTHON) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) lightning_logs
