# inkseg: make demo (whole pipeline on synthetic data), make test (the test suite).
# Every target that runs Python builds .venv first; that step is a no-op when requirements.txt is unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SYNTH := data/synth
DATA ?= $(SYNTH)
SIZE ?= 1024
SEED ?= 0
STORES ?= data/prepared

.PHONY: setup demo synth validate prepare test bench bench-prepare clean-data

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

synth: setup
	$(PY) -m lib.synth $(SYNTH) --size $(SIZE) --seed $(SEED)

validate: setup
	$(PY) -m lib.fragments $(DATA)

# With no DATA, prepare the synthetic dataset (generated first if missing).
prepare: setup $(if $(filter $(SYNTH),$(DATA)),synth)
	$(PY) prepare.py --data $(DATA) --out $(STORES)

demo: synth validate prepare

test: setup
	$(PY) -m pytest -q tests

bench: bench-prepare

bench-prepare: setup
	$(PY) bench/bench_prepare.py

clean-data:
	rm -rf $(SYNTH) $(SYNTH).partial
