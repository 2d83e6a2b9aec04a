# `make demo`: the toy world (examples/toy/): theta_0 built from scratch, SFT vs SPIN vs DPO, judged exactly (CPU, ~10 min).
# `make test`: the offline test suite.
# Both create .venv and install requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test clean

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
	$(PY) -m pytest tests -q -p no:cacheprovider

clean:
	rm -rf demo_output
