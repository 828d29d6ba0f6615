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

.PHONY: install browser finetune test test-slow test-all test-fast bench data docs layers clean lock

install: $(STAMP)

# Every extra, the test tools and the docs tools (tests/test_docs.py builds the site), at the
# versions the suite last passed with (constraints.txt, refreshed by `make lock`): a new upstream
# release cannot break main without a commit.
EXTRAS ?= all,test,docs
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(call q,$(BIN)/python) || $(call q,$(PYTHON)) -m venv $(call q,$(VENV))
	$(call q,$(BIN)/python) -m pip install -q --upgrade pip
	$(call q,$(BIN)/python) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(call q,$(STAMP))

# constraints.txt: the versions installed now (after a green `make test`), for the next install.
lock: $(STAMP)
	$(call q,$(BIN)/python) -m pip freeze --exclude-editable --all | grep -v -E '^(pip|setuptools|wheel)==' \
		| sed '1i # pip constraints: the versions `make test` last passed with (`make lock` rewrites it)' > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

# The browser tests (tests/test_browser.py) drive the system's Chromium through Playwright (its own
# browser download is not used). Installed with apt when missing and we are root (CI on Debian);
# otherwise a note: those tests then skip, or fail when CI is set.
CHROMIUM_NAMES = chromium chromium-browser google-chrome google-chrome-stable
browser:
	@for b in $(CHROMIUM_NAMES); do command -v $$b >/dev/null 2>&1 && exit 0; done; \
	if [ -n "$$TUNEFLOW_CHROMIUM" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make: installing chromium for the browser tests (apt-get)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else \
		echo "make: no Chromium found: install it (Debian: sudo apt-get install chromium) for the browser tests" >&2; \
	fi

finetune: $(STAMP)
	$(call q,$(BIN)/tuneflow) finetune $(call q,$(RECIPE)) --data $(call q,$(DATA)) $(if $(OUT),--out $(call q,$(OUT))) $(ARGS)

# Two test processes (pytest-xdist), a test file per process at a time (module fixtures are built
# once): most of a small test's time is single-threaded Python (tracing, export, process start-up),
# so two processes use both cores. TEST_JOBS=1 runs them in one process.
# `make test` is the suite every change must pass (within 15 minutes on 2 cores): everything not
# marked slow. `make test-slow` is the rest (tests over ~30 s: fine-tuning recipes, real ImageNet
# weights, real data, subprocess fleets, kill -9 fault injection, multi-worker training); CI runs
# both (.ci/run). `make test-all` runs the two tiers in one pytest session.
TEST_JOBS ?= 2
XDIST = $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile)
test: $(STAMP) browser
	$(call q,$(BIN)/python) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP) browser
	$(call q,$(BIN)/python) -m pytest $(XDIST) -m slow $(PYTEST_ARGS)

test-all: $(STAMP) browser
	$(call q,$(BIN)/python) -m pytest $(XDIST) $(PYTEST_ARGS)

# The inner loop (a few minutes): the unit-level modules and one end-to-end run with its artifact,
# nothing marked slow. `make test` runs the whole quick tier, `make test-all` everything.
FAST_TESTS = tests/test_dependencies.py tests/test_recipe.py tests/test_optim.py tests/test_pipeline.py \
	tests/test_data.py tests/test_store.py tests/test_pack.py tests/test_extractor.py tests/test_imageops.py \
	tests/test_atomic.py tests/test_hardware.py tests/test_report.py \
	tests/test_probe.py tests/test_index.py tests/test_recipes.py tests/faults/test_bad_data.py \
	tests/faults/test_overrides.py tests/faults/test_run_folder.py tests/faults/test_disk_errors.py \
	tests/test_artifact.py::test_run_folder_holds_the_portable_artifact \
	tests/test_cache.py::test_feature_cache_written_as_it_goes_and_read_back_mapped \
	tests/test_cache.py::test_heads_train_from_a_memory_mapped_cache_without_copying_it \
	tests/test_cache.py::test_views_of_a_mapped_cache_are_read_with_pread_at_their_own_offsets \
	tests/test_standardise.py::test_feature_moments_over_views_and_memory_maps \
	tests/test_standardise.py::test_begin_then_fold_is_exact_and_the_twin_computes_what_the_head_does \
	tests/test_standardise.py::test_sgd_learns_badly_scaled_features_only_when_standardised
test-fast: $(STAMP)
	$(call q,$(BIN)/python) -m pytest $(XDIST) -m "not slow" -x -q $(FAST_TESTS) $(PYTEST_ARGS)

bench: $(STAMP)
	$(call q,$(BIN)/python) benchmarks/bench_recipes.py
	$(call q,$(BIN)/python) benchmarks/bench_features.py
	$(call q,$(BIN)/python) benchmarks/bench_precision.py
	$(call q,$(BIN)/python) benchmarks/bench_pipeline.py

data: $(STAMP)
	$(call q,$(BIN)/python) data/make_digits.py

# The documentation site: docs/*.md and mkdocs.yml into site/ (git-ignored); --strict turns a broken
# link, a missing anchor or a page left out of the navigation into an error.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(call q,$(BIN)/python) -m mkdocs build --strict --site-dir site

# The layers and the imports between them (grimp), drawn into docs/img/layers.png for docs/design.md.
layers: $(STAMP)
	$(call q,$(BIN)/python) tools/draw_layers.py --out docs/img/layers.png

clean:
	rm -rf $(call q,$(VENV)) .pytest_cache build *.egg-info site
