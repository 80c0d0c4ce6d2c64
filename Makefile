# Two commands on a fresh machine:
#   make demo   set up .venv, install hwnas, run the main job on the default data
#   make test   same environment, run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hwnas-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test venv data bench clean

venv: $(STAMP)

# Reinstall when the project's dependencies change.
$(STAMP): pyproject.toml deploy/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ./deploy -e '.[dev]'
	@touch $(STAMP)

# Fashion-MNIST comes from Debian's package (no download from any data host).
data:
	@if [ -d $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" \
	       "(or point data.data_dir at a copy of its IDX files)"; \
	fi

demo: $(STAMP) data
	$(BIN)/hwnas run configs/quickstart.yaml

test: $(STAMP) data
	$(BIN)/python -m pytest -q --durations=15

bench: $(STAMP) data
	$(BIN)/python benchmarks/bench_foundation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
