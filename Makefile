# inkseg: make demo (whole pipeline on synthetic data), make test (the test suite).
# Every target that runs Python builds .venv first; that step is a no-op when requirements.txt is unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LAYOUT ?= kaggle
# LAYOUT=segments: the synthetic data in the scroll-segment layout (segment b reversed in depth, a 8-bit JPEG),
# with its own stores and run; the demo then ends with probability PNGs instead of a CSV.
SEG := $(filter segments,$(LAYOUT))
SYNTH := data/synth$(if $(SEG),-segments)
DATA ?= $(SYNTH)
SIZE ?= 640
SEED ?= 0
STORES ?= data/prepared$(if $(SEG),-segments)
RUN ?= runs/demo$(if $(SEG),-segments)
PRESET ?= demo
TRAIN_ARGS ?=

.PHONY: setup demo synth validate prepare train ensemble submit score test bench bench-prepare bench-train bench-submit clean-data

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

synth: setup
	$(PY) -m lib.synth $(SYNTH) --size $(SIZE) --seed $(SEED) --layout $(LAYOUT)

validate: setup
	$(PY) -m lib.fragments $(DATA)

# With no DATA, prepare the synthetic dataset (generated first if missing).
prepare: setup $(if $(filter $(SYNTH),$(DATA)),synth)
	$(PY) prepare.py --data $(DATA) --out $(STORES) $(if $(SEG),$(if $(filter $(SYNTH),$(DATA)),--reverse b))

# Resumes an interrupted run; a finished run is kept (train.py refuses to overwrite it without --force).
train: setup
	$(PY) train.py --stores $(STORES) --run $(RUN) --preset $(PRESET) $(if $(wildcard $(RUN)/tune),--resume) $(TRAIN_ARGS)

ensemble: setup
	$(PY) ensemble.py --run $(RUN) --stores $(STORES)

submit: setup
	$(PY) submit.py --run $(RUN) --stores $(STORES) $(if $(filter $(SYNTH),$(DATA)),--truth $(SYNTH)/_truth) $(if $(SEG),--png,--sample $(DATA)/sample_submission.csv)

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

clean-data:
	rm -rf $(SYNTH) $(SYNTH).partial
