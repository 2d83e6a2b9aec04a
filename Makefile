# `make demo`: the toy world (examples/toy/): theta_0 built from scratch, SFT vs SPIN vs DPO, judged exactly (CPU, ~10 min).
# `make test`: ruff (lint and format check, ruff.toml) and the offline test suite.
# Both create .venv and install requirements.txt on first use.
# `make gpu-wheels`: fetch into gpu_wheels/ what bench/gpu_check.sh needs on an offline GPU machine (needs PyPI).
# `make gpu-rehearsal`: bench/gpu_check.sh on CPU in a venv holding only the offline H200's packages (.venv-h200).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test gpu-wheels gpu-rehearsal clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@if $(PY) -m pip list 2>/dev/null | grep -qi nvidia; then \
		echo "error: a CUDA build of torch was installed; requirements.txt must pin torch==2.13.0"; exit 1; fi
	touch $@

demo: $(VENV)/.installed
	PATH=$(abspath $(VENV))/bin:$$PATH bash examples/demo.sh

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest tests -q -p no:cacheprovider

gpu-wheels:
	PYTHON=$(PYTHON) bash bench/fetch_gpu_wheels.sh gpu_wheels

gpu-rehearsal: gpu-wheels
	PYTHON=$(PYTHON) bash bench/rehearse_gpu_check.sh

clean:
	rm -rf demo_output
