# inkseg: make demo (whole pipeline on synthetic data), make test (the test suite).
# The steps chain by their files: the stores, RUN/summary.md, RUN/ensemble.json and RUN/submission.csv are real
# targets, so `make submit` builds exactly what is missing or stale, in order, and a second call does nothing.
# Every step builds .venv first; that is a no-op when requirements.txt is unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LAYOUT ?= kaggle
# LAYOUT=segments: the synthetic data in the scroll-segment layout (segment b reversed in depth, which prepare.py
# finds itself, a 8-bit JPEG), with its own stores and run; the demo then ends with probability PNGs instead of a CSV.
SEG := $(filter segments,$(LAYOUT))
SYNTH := data/synth$(if $(SEG),-segments)
DATA ?= $(SYNTH)
IS_SYNTH := $(filter $(SYNTH),$(DATA))
SIZE ?= 640
SEED ?= 0
DIFFICULTY ?= medium
GEOMETRY ?= thick
PRESET ?= demo
# Each dataset has its stores and each preset and dataset its run (the demo's: runs/demo), so that
# `make submit DATA=X PRESET=full` after the demo trains a run of its own. The scripts refuse a run with train
# stores it was not trained on (other data, or prepared again since), naming the run and what it was trained on.
DATA_NAME = $(notdir $(abspath $(DATA)))
STORES ?= $(if $(IS_SYNTH),data/prepared$(if $(SEG),-segments),data/prepared-$(DATA_NAME))
RUN ?= $(if $(and $(IS_SYNTH),$(filter demo,$(PRESET))),runs/demo$(if $(SEG),-segments),runs/$(PRESET)-$(DATA_NAME))
PREPARE_ARGS ?=
TRAIN_ARGS ?=
SUBMIT_ARGS ?=

SYNTH_DONE := $(SYNTH)/_truth/synth.json
PREPARE_DONE := $(STORES)/.prepared
PREPARED := $(STORES)/prepared.json
SUMMARY := $(RUN)/summary.md
ENSEMBLE := $(RUN)/ensemble.json
# segments: probability PNGs in RUN/predictions, no CSV (a stamp marks them done)
SUBMISSION := $(if $(SEG),$(RUN)/predictions/.done,$(RUN)/submission.csv)
# The dataset's files, so that prepare reruns when one changes (prepare.py itself skips unchanged stores).
DATA_FILES := $(wildcard $(DATA)/*/*/surface_volume/*.tif $(DATA)/*/*/*.png $(DATA)/*/layers/* $(DATA)/*/*.png)
# Stores prepared from another dataset than DATA: prepare again.
ifneq ($(shell grep -s -o '"data": "[^"]*"' $(PREPARED)),"data": "$(abspath $(DATA))")
PREPARE_DONE_DEP := FORCE
endif
# A run whose status.json (written by train.py) does not say finished (trials failed, interrupted, or a crash while
# they ran) is not done: train resumes it.
ifeq ($(shell grep -s -o '"state": "finished"' $(RUN)/status.json),)
SUMMARY_DEP := FORCE
endif

.PHONY: setup demo synth validate prepare train ensemble submit test test-fast lint bench bench-prepare bench-submit bench-scale bench-gpu sweep clean-data FORCE

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

synth: $(SYNTH_DONE)

$(SYNTH_DONE): | $(VENV)/.installed
	$(PY) -m lib.synth $(SYNTH) --size $(SIZE) --seed $(SEED) --difficulty $(DIFFICULTY) --layout $(LAYOUT) \
		--geometry $(GEOMETRY)

validate: $(if $(IS_SYNTH),$(SYNTH_DONE)) | $(VENV)/.installed
	$(PY) -m lib.fragments $(DATA)

prepare: $(PREPARED)

# prepare.py rewrites prepared.json only when a store changed, so the steps after it rerun only then.
$(PREPARE_DONE): $(if $(IS_SYNTH),$(SYNTH_DONE)) $(DATA_FILES) $(PREPARE_DONE_DEP) | $(VENV)/.installed
	$(PY) prepare.py --data $(DATA) --out $(STORES) $(PREPARE_ARGS)
	touch $@

$(PREPARED): $(PREPARE_DONE) ;

# A finished run is kept as it is (retrain with train.py --force or another RUN=); an interrupted or failed one is
# resumed with the config recorded in its run.json.
train: $(SUMMARY)
	@echo "make train: $(RUN) is trained; scores in $(SUMMARY)"

$(SUMMARY): $(SUMMARY_DEP) | $(PREPARED)
	@if [ -f $(RUN)/run.json ]; then \
		echo "make train: resuming the unfinished run in $(RUN) with the config in $(RUN)/run.json"; \
		echo "$(PY) train.py --run $(RUN) --resume $(TRAIN_ARGS)"; \
		$(PY) train.py --run $(RUN) --resume $(TRAIN_ARGS); \
	else \
		echo "$(PY) train.py --stores $(STORES) --run $(RUN) --preset $(PRESET) $(TRAIN_ARGS)"; \
		$(PY) train.py --stores $(STORES) --run $(RUN) --preset $(PRESET) $(TRAIN_ARGS); \
	fi

ensemble: $(ENSEMBLE)

$(ENSEMBLE): $(SUMMARY)
	$(PY) ensemble.py --run $(RUN)

submit: $(SUBMISSION)

$(SUBMISSION): $(ENSEMBLE) $(PREPARED)
	$(PY) submit.py --run $(RUN) --stores $(STORES) $(if $(IS_SYNTH),--truth $(SYNTH)/_truth) \
		$(if $(SEG),--png,--sample $(DATA)/sample_submission.csv) $(SUBMIT_ARGS)
	$(if $(SEG),touch $@)

demo: validate submit

# The full suite (what CI runs); test-fast leaves out the tests marked slow, e2e or ray (pyproject.toml), for the
# edit loop. lint: ruff with the rules in pyproject.toml.
test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not slow and not e2e and not ray"

lint: setup
	$(VENV)/bin/ruff check .

# Each writes its table into bench/README.md. bench-gpu measures on a GPU when there is one, else a tiny CPU version.
bench: bench-prepare bench-submit bench-gpu

bench-prepare: setup
	$(PY) bench/bench_prepare.py

bench-submit: setup
	$(PY) bench/bench_submit.py

bench-gpu: setup
	$(PY) bench/bench_gpu.py

bench-loader: setup
	$(PY) bench/bench_loader.py

# Scroll scale: submit.py's peak RSS on 20 000 x 10 000 and 40 000 x 20 000 px segments, 1 vs 2 Ray workers, prepare
# from zarr over HTTP vs local TIFF (heavy: tens of minutes; not part of `make bench`).
bench-scale: setup
	$(PY) bench/bench_scale.py

# The demo recipe at three difficulty levels of the synthetic ink (tens of minutes on 2 cores).
sweep: setup
	$(PY) bench/bench_models.py

clean-data:
	rm -rf $(SYNTH) $(SYNTH).partial

FORCE:
