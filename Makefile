# tuneflow: `make finetune` and `make test` set up .venv on first use, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

RECIPE ?= small_similar
DATA   ?= data/digits
OUT    ?=
ARGS   ?=

.PHONY: install finetune test bench data clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

finetune: $(STAMP)
	$(BIN)/tuneflow finetune $(RECIPE) --data $(DATA) $(if $(OUT),--out $(OUT)) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_recipes.py
	$(BIN)/python benchmarks/bench_features.py
	$(BIN)/python benchmarks/bench_precision.py
	$(BIN)/python benchmarks/bench_pipeline.py

data: $(STAMP)
	$(BIN)/python data/make_digits.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
