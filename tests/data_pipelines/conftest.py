"""Prepared data shared by the data_pipelines tests, made once per session (the slow part)."""

import copy

import pytest

from data_pipelines.prepare import prepare_data

# The project's tiny default (data config `tiny_synthetic`), written out here so the tests do not
# depend on the Hydra config tree.
TINY_CONFIG = {
    "name": "tiny_synthetic",
    "tokenizer": {"path": None, "vocab_size": 512},
    "sources": {
        "prose": {"generator": "prose", "num_docs": 3000},
        "arithmetic": {"generator": "arithmetic", "num_docs": 3000},
        "code": {"generator": "code", "num_docs": 2000},
    },
    "mixes": {
        "main": {"prose": 0.6, "arithmetic": 0.2, "code": 0.2},
        "anneal": {"prose": 0.2, "arithmetic": 0.6, "code": 0.2},
    },
    "split": "95,5,0",
}


@pytest.fixture
def tiny_config():
    return copy.deepcopy(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_prepared_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tiny") / "prepared"
    prepare_data(copy.deepcopy(TINY_CONFIG), out_dir, seed=0)
    return out_dir


@pytest.fixture
def tiny_prepared(tiny_prepared_dir):
    """Reloaded from the manifest each time, so a test may mutate the returned object."""
    return prepare_data(copy.deepcopy(TINY_CONFIG), tiny_prepared_dir, seed=0)
