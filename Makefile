# The two commands of the quick start, plus their set-up. Each target creates or updates .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
STAMP := $(VENV)/.turbolaser-installed

.PHONY: demo test install clean-demo

install: $(STAMP)

# Re-install when the package metadata or the pins change.
$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "TurboLaser needs Python 3.11, found " + sys.version' 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

# The whole staged pipeline on the tiny default model, on CPU. RUN_DIR=... picks the run folder,
# ARGS="model=tiny_turbos ..." passes Hydra overrides;
# re-running skips finished stages and resumes an unfinished one.
demo: $(STAMP)
	$(PY) -m launch run_dir=$(RUN_DIR) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest

clean-demo:
	rm -rf $(RUN_DIR)
