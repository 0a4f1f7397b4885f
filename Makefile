# inkseg: make demo (whole pipeline on synthetic data), make test (the test suite).
# Every target that runs Python builds .venv first; that step is a no-op when requirements.txt is unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SYNTH := data/synth
DATA ?= $(SYNTH)
SIZE ?= 640
SEED ?= 0
DIFFICULTY ?= medium
STORES ?= data/prepared
RUN ?= runs/demo
PRESET ?= demo
TRAIN_ARGS ?=

.PHONY: setup demo synth validate prepare train ensemble submit score test bench bench-prepare bench-train bench-submit sweep clean-data

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

synth: setup
	$(PY) -m lib.synth $(SYNTH) --size $(SIZE) --seed $(SEED) --difficulty $(DIFFICULTY)

validate: setup
	$(PY) -m lib.fragments $(DATA)

# With no DATA, prepare the synthetic dataset (generated first if missing).
prepare: setup $(if $(filter $(SYNTH),$(DATA)),synth)
	$(PY) prepare.py --data $(DATA) --out $(STORES)

# Resumes an interrupted run; a finished run is kept (train.py refuses to overwrite it without --force).
train: setup
	$(PY) train.py --stores $(STORES) --run $(RUN) --preset $(PRESET) $(if $(wildcard $(RUN)/tune),--resume) $(TRAIN_ARGS)

ensemble: setup
	$(PY) ensemble.py --run $(RUN) --stores $(STORES)

submit: setup
	$(PY) submit.py --run $(RUN) --stores $(STORES) $(if $(filter $(SYNTH),$(DATA)),--truth $(SYNTH)/_truth) --sample $(DATA)/sample_submission.csv

demo: synth validate prepare train ensemble submit

test: setup
	$(PY) -m pytest -q tests

bench: bench-prepare bench-train bench-submit

bench-prepare: setup
	$(PY) bench/bench_prepare.py

bench-train: setup
	$(PY) bench/bench_train.py

bench-submit: setup
	$(PY) bench/bench_submit.py

# The demo recipe at three difficulty levels of the synthetic ink (tens of minutes on 2 cores).
sweep: setup
	$(PY) bench/bench_models.py

clean-data:
	rm -rf $(SYNTH) $(SYNTH).partial
