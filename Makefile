# Two entry points for a fresh machine: `make demo` (the main job, offline) and `make test`.
# Both create or reuse the project venv in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.curate-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --upgrade --no-deps --target $(VENV)/open_clip_train_deps 'webdataset==0.2.86'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/curate demo

test: $(STAMP)
	RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 HF_HUB_DISABLE_XET=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf demo-output .pytest_cache
