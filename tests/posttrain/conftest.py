"""Fixtures of the post-training tests: a small prepared data folder with its trained tokenizer."""

import pytest

from data_pipelines.prepare import prepare_data

SMALL_DATA = {
    "name": "tiny_synthetic",
    "tokenizer": {"path": None, "vocab_size": 512},
    "sources": {
        "prose": {"generator": "prose", "num_docs": 300},
        "arithmetic": {"generator": "arithmetic", "num_docs": 300},
        "code": {"generator": "code", "num_docs": 200},
    },
    "mixes": {"main": {"prose": 0.6, "arithmetic": 0.2, "code": 0.2}},
    "split": "95,5,0",
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return prepare_data(SMALL_DATA, tmp_path_factory.mktemp("posttrain") / "data", seed=0).tokenizer_dir
