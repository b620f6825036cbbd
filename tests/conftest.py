"""Fixtures shared by every test folder.

The repository root goes on sys.path so `pytest` works without installing the project, and
multi-process tests share one launcher (`torchrun`) instead of each rolling their own.
"""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import megatron_ext  # noqa: E402,F401  (before any test imports megatron-core: megatron_ext.lazy_compile)


def run_torchrun(script, *args, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a script under `torch.distributed.run --standalone` with `nproc` local processes.

    The script initialises its own process group (gloo on CPU) from torchrun's environment.
    Returns the CompletedProcess; a non-zero exit fails the test with the processes' output.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(script), *map(str, args)]
    pythonpath = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}\n"
                    f"--- stdout ---\n{proc.stdout[-5000:]}\n"
                    f"--- stderr ---\n{proc.stderr[-5000:]}")
    return proc


@pytest.hookimpl(tryfirst=True)   # before pytest-xdist reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Scheduling for ``pytest -n 2`` (pytest-xdist, ``--dist loadgroup``, the default in setup.cfg): a
    test module is one unit, so a module-scoped fixture (a pipeline run, a set of parallel layouts) is
    made once, on one worker; the modules that use the one-node Slurm cluster form one unit, since
    the cluster is per worker and two would share this machine's CPUs and hostname."""
    slurm_modules = {item.module.__name__ for item in items
                     if {"slurm_cluster", "slurm_available"} & set(getattr(item, "fixturenames", ()))}
    for item in items:
        name = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("slurm" if name in slurm_modules else name))


@pytest.fixture
def torchrun():
    """The shared multi-process launcher (see :func:`run_torchrun`)."""
    return run_torchrun


@pytest.fixture(scope="module")
def torchrun_module():
    """:func:`run_torchrun` for module-scoped fixtures."""
    return run_torchrun
