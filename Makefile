# `make train`: set up and train a small WeTok tokenizer on the embedded dataset (CPU, minutes).
# `make demo`:  set up and run the whole pipeline (tokenizer, codes, generator, samples, FIDs,
#               exports) into runs/demo, with runs/demo/report.md at the end (~30 min on CPU).
# `make test`:  set up and run the test suite.
PYTHON := $(if $(VIRTUAL_ENV),python,.venv/bin/python)
export HF_HUB_OFFLINE := 1
# OpenMP threads spin-wait 200 ms by default: on a busy CPU that stalls small conv nets several
# times over. Yield at once instead (no effect on GPU runs).
export KMP_BLOCKTIME ?= 0

.PHONY: setup train demo test lint

setup:
	bash scripts/setup.sh

train: setup
	$(PYTHON) train.py --config tokenizer/wetok.yaml --config presets/cpu_demo.yaml

demo: setup
	$(PYTHON) -m vistok.pipeline --preset cpu_small --out runs/demo

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -ra -n 2 --dist loadfile --durations=25

lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
