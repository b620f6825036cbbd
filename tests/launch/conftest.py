"""Fixtures for the launcher's tests: a real one-node Slurm cluster (see tests/slurm_cluster.py)."""

import os

import pytest

from tests.slurm_cluster import LocalSlurmCluster, ensure_installed

REQUIRE_SLURM_ENV = "TURBOLASER_REQUIRE_SLURM"


def slurm_unavailable(reason: str) -> None:
    """Skip with the reason, or fail where CI demands Slurm (TURBOLASER_REQUIRE_SLURM=1)."""
    message = f"no local Slurm cluster: {reason}"
    if os.environ.get(REQUIRE_SLURM_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_SLURM_ENV}=1 requires it)", pytrace=False)
    pytest.skip(f"{message} (set {REQUIRE_SLURM_ENV}=1 to make this a failure)")


@pytest.fixture(scope="session")
def slurm_available() -> None:
    """Installs Slurm if it can (root + apt-get); skips or fails with the reason if not."""
    reason = ensure_installed()
    if reason is not None:
        slurm_unavailable(reason)


@pytest.fixture(scope="session")
def slurm_cluster(slurm_available) -> LocalSlurmCluster:
    """One cluster for the whole session; jobs share it, so give each its own output paths."""
    with LocalSlurmCluster() as cluster:
        yield cluster
