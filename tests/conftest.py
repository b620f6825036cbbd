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


@pytest.fixture
def torchrun():
    """The shared multi-process launcher (see :func:`run_torchrun`)."""
    return run_torchrun


@pytest.fixture(scope="module")
def torchrun_module():
    """:func:`run_torchrun` for module-scoped fixtures."""
    return run_torchrun
