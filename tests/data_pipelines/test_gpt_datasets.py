import json
import os
from collections import Counter
from dataclasses import asdict

import pytest
import torch

from data_pipelines.errors import DataConfigError
from data_pipelines.gpt_datasets import build_gpt_datasets
from data_pipelines.tokenizer import load_tokenizer

SEQ = 64


def _source_counts(dataset, prepared):
    """Samples per source, read from BlendedDataset's dataset_index."""
    by_prefix = {p: s for s, p in prepared.prefixes.items()}
    counts = Counter(dataset.dataset_index.tolist())
    return {by_prefix[dataset.datasets[i].dataset_path]: n for i, n in counts.items()}


@pytest.mark.parametrize("mix_name", ["main", "anneal"])
def test_blend_hits_its_weights(tiny_prepared, tiny_config, tmp_path, mix_name):
    mix = tiny_config["mixes"][mix_name]
    train_ds, valid_ds = build_gpt_datasets(
        tiny_prepared, mix, SEQ, train_samples=10000, valid_samples=500, seed=1234,
        split=tiny_config["split"], cache_dir=tmp_path,
    )
    for dataset, size, tolerance in [(train_ds, 10000, 0.01), (valid_ds, 500, 0.02)]:
        assert len(dataset) >= size
        counts = _source_counts(dataset, tiny_prepared)
        for source, weight in mix.items():
            assert counts[source] / len(dataset) == pytest.approx(weight, abs=tolerance)


def test_samples(tiny_prepared, tiny_config, tmp_path):
    train_ds, _ = build_gpt_datasets(
        tiny_prepared, tiny_config["mixes"]["main"], SEQ, 200, 20, seed=0, split="95,5,0",
        cache_dir=tmp_path,
    )
    eod = load_tokenizer(tiny_prepared.tokenizer_dir).eod
    saw_eod = False
    for i in range(50):
        sample = train_ds[i]
        assert {"tokens", "labels", "loss_mask", "position_ids"} <= set(sample)
        assert "attention_mask" not in sample
        for key in ["tokens", "labels", "loss_mask", "position_ids"]:
            assert sample[key].shape == (SEQ,)
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # next-token targets
        assert torch.equal(sample["position_ids"], torch.arange(SEQ))
        assert bool(sample["loss_mask"].all())  # packed samples: nothing is padding
        saw_eod |= bool((sample["tokens"] == eod).any())
    assert saw_eod  # documents are packed across eod boundaries


def test_cached_rebuild_is_identical(tiny_prepared, tiny_config, tmp_path):
    def build():
        return build_gpt_datasets(tiny_prepared, tiny_config["mixes"]["main"], SEQ, 300, 30,
                                  seed=5, split="95,5,0", cache_dir=tmp_path)

    first, _ = build()
    assert os.listdir(tmp_path)  # per-source indices were cached
    second, _ = build()
    for i in range(0, 300, 37):
        assert torch.equal(first[i]["tokens"], second[i]["tokens"])


def test_zero_weight_source_is_skipped(tiny_prepared, tmp_path):
    train_ds, _ = build_gpt_datasets(tiny_prepared, {"prose": 1.0, "code": 0.0, "arithmetic": 0},
                                     SEQ, 100, 10, seed=0, split="95,5,0", cache_dir=tmp_path)
    assert [d.dataset_path for d in train_ds.datasets] == [tiny_prepared.prefixes["prose"]]


def test_unknown_mix_source(tiny_prepared, tmp_path):
    with pytest.raises(DataConfigError, match=r"mixes: unknown source 'poems'.*arithmetic"):
        build_gpt_datasets(tiny_prepared, {"prose": 0.5, "poems": 0.5}, SEQ, 100, 10, seed=0,
                           split="95,5,0", cache_dir=tmp_path)


def test_bad_split(tiny_prepared, tmp_path):
    with pytest.raises(DataConfigError, match="split"):
        build_gpt_datasets(tiny_prepared, {"prose": 1}, SEQ, 100, 10, seed=0, split="95/5",
                           cache_dir=tmp_path)


def test_inside_a_gloo_process_group(tiny_prepared, tiny_config, tmp_path, torchrun):
    args = {"mix": tiny_config["mixes"]["anneal"], "seq_length": SEQ, "train_samples": 1000,
            "valid_samples": 100, "seed": 3, "split": "95,5,0",
            "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "args.json").write_text(
        json.dumps({**args, "prepared": asdict(tiny_prepared), "num_checked": 8}))
    worker = os.path.join(os.path.dirname(__file__), "gpt_datasets_worker.py")
    torchrun(worker, tmp_path / "args.json", tmp_path, nproc=2)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank sees the same data
    # ... and the same data as a build without torch.distributed (its own cache)
    train_ds, valid_ds = build_gpt_datasets(tiny_prepared, **{**args, "cache_dir": tmp_path / "c2"})
    assert ranks[0]["dataset_index"] == train_ds.dataset_index.tolist()
    assert ranks[0]["train_tokens"] == [train_ds[i]["tokens"].tolist() for i in range(8)]
    assert ranks[0]["valid_tokens"] == [valid_ds[i]["tokens"].tolist() for i in range(8)]
