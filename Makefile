# Two commands for a newcomer: `make bench` and `make test`. Both create .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: bench test venv clean assets

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,hf]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

bench: $(STAMP)
	$(BIN)/python -m eval.benchmark --config configs/bench/tiny.yaml

assets: $(STAMP)
	bash scripts/make_assets.sh

clean:
	rm -rf $(VENV) .pytest_cache
