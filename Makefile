# tuneflow: `make finetune` and `make test` set up .venv on first use, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

RECIPE ?= small_similar
DATA   ?= data/digits
OUT    ?=
ARGS   ?=

# $(call q,VALUE): VALUE as one shell word, whatever it holds (spaces, quotes, $): wrapped in single
# quotes, each ' inside written as '\''. ARGS and PYTEST_ARGS stay unquoted: they are several words.
# (VENV and STAMP are make targets, which cannot hold spaces; the repository's own path may.)
q = '$(subst ','\'',$(1))'

.PHONY: install finetune test test-fast bench data clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(call q,$(BIN)/python) || $(call q,$(PYTHON)) -m venv $(call q,$(VENV))
	$(call q,$(BIN)/python) -m pip install -q --upgrade pip
	$(call q,$(BIN)/python) -m pip install -q -e ".[test]"
	touch $(call q,$(STAMP))

finetune: $(STAMP)
	$(call q,$(BIN)/tuneflow) finetune $(call q,$(RECIPE)) --data $(call q,$(DATA)) $(if $(OUT),--out $(call q,$(OUT))) $(ARGS)

test: $(STAMP)
	$(call q,$(BIN)/python) -m pytest $(PYTEST_ARGS)

# The inner loop: everything not marked slow (no real weights, subprocess fleets or real data).
test-fast: $(STAMP)
	$(call q,$(BIN)/python) -m pytest -m "not slow" -x -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(call q,$(BIN)/python) benchmarks/bench_recipes.py
	$(call q,$(BIN)/python) benchmarks/bench_features.py
	$(call q,$(BIN)/python) benchmarks/bench_precision.py
	$(call q,$(BIN)/python) benchmarks/bench_pipeline.py

data: $(STAMP)
	$(call q,$(BIN)/python) data/make_digits.py

clean:
	rm -rf $(call q,$(VENV)) .pytest_cache build *.egg-info
