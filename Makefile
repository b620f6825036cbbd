# The two commands of the quick start, plus their set-up. Each target creates or updates .venv.
# Python 3.12 (megatron-core >= 0.17 needs it): `python3.12` on PATH, else pyenv's newest 3.12.
PYTHON ?= $(shell for p in python3.12 $$(ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1); do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
STAMP := $(VENV)/.turbolaser-installed

.PHONY: demo test install clean-demo test-mcore016

install: $(STAMP)

# Re-install when the package metadata or the pins change.
$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt
	@test -n "$(PYTHON)" || { echo "TurboLaser's venv needs Python 3.12 (python3.12 on PATH, or pyenv install 3.12); or set PYTHON=/path/to/python3.12"; exit 1; }
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 12), "TurboLaser needs Python 3.12, found " + sys.version'
	@# a venv of another Python (e.g. an older 3.11 checkout's) is made anew
	$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
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

# megatron-core 0.16.1 (the last release for Python 3.11), still supported through
# megatron_ext/mcore_compat.py: a smoke subset in its own venv (CI runs it after `make test`).
PYTHON311 ?= $(shell for p in python3.11 $$(ls -d $$HOME/.pyenv/versions/3.11*/bin/python3.11 2>/dev/null | sort -V | tail -n 1); do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null && { echo "$$p"; break; }; done)
VENV016 ?= .venv-mcore016
STAMP016 := $(VENV016)/.turbolaser-installed
MCORE016_SMOKE := tests/megatron_ext/test_parallel_parity.py tests/megatron_ext/test_checkpoint_resume.py::test_resume_equals_straight_run \
	tests/megatron_ext/test_fault_tolerance.py::test_nan_gradient_with_finite_loss_skips_the_update \
	tests/megatron_ext/models/test_grouped_experts.py tests/posttrain/test_rl_loss.py

$(STAMP016): setup.cfg pyproject.toml requirements/constraints.txt
	@test -n "$(PYTHON311)" || { echo "the megatron-core 0.16.1 smoke run needs Python 3.11 (or PYTHON311=/path/to/python3.11)"; exit 1; }
	$(VENV016)/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { rm -rf $(VENV016); $(PYTHON311) -m venv $(VENV016); }
	sed 's/^megatron-core==.*/megatron-core==0.16.1/' requirements/constraints.txt > $(VENV016)/constraints.txt
	$(VENV016)/bin/python -m pip install --quiet --upgrade pip
	$(VENV016)/bin/python -m pip install --quiet -c $(VENV016)/constraints.txt -e '.[dev]'
	touch $(STAMP016)

# both families, TP2 and CP2 parity (and the checkpoint reshard it loads through), resume, the NaN guard,
# grouped experts, the RL loss
test-mcore016: $(STAMP016)
	TURBOLASER_PARITY_LAYOUTS=tp2,cp2 $(VENV016)/bin/python -m pytest -p no:cacheprovider $(MCORE016_SMOKE)
