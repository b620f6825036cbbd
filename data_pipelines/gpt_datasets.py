"""Blended GPT train/valid datasets over prepared sources, built by megatron-core.

Two megatron-core behaviours shape this module:
- Cached indices are named by a hash of dataset path, seed, lengths and tokenizer, not of the
  tokens: re-preparing different data at the same path would silently reuse stale indices. So
  the cache lives under `cache_dir/<data fingerprint>`.
- `BlendedDataset` calls `torch.distributed.get_rank()` on a cache miss whenever a cache path is
  set, which raises without a process group. Without one, we build the (cheap) blend indices
  uncached; the per-source GPTDataset indices are still cached. Under a process group every rank
  must call this together with the same `cache_dir`: rank 0 builds, the others load after a barrier.
"""

import copy
import os
import re
from typing import Mapping, Optional

import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from data_pipelines.errors import DataConfigError
from data_pipelines.prepare import PreparedData, data_fingerprint, resolve_mix
from data_pipelines.tokenizer import load_tokenizer

_SPLIT = re.compile(r"^\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){0,2}\s*$")


class _Builder(BlendedMegatronDatasetBuilder):
    """megatron-core's builder, except that without a process group the BlendedDataset is built
    without a cache path (its cache-miss branch needs one; see the module docstring)."""

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is BlendedDataset and not torch.distributed.is_initialized():
            *head, config = args
            config = copy.copy(config)
            config.path_to_cache = None  # see the module docstring
            args = (*head, config)
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            cls, is_built_on_rank, synchronize_ranks, *args
        )


def build_gpt_datasets(
    prepared: PreparedData,
    mix: Mapping[str, float],
    seq_length: int,
    train_samples: int,
    valid_samples: int,
    seed: int,
    split: str,
    cache_dir: str | os.PathLike,
) -> tuple[Optional[BlendedDataset], Optional[BlendedDataset]]:
    """Train and valid BlendedDatasets drawing from the mix's sources in the mix's proportions.

    A sample is GPTDataset's dict (tokens, labels, loss_mask, position_ids: seq_length each) plus
    BlendedDataset's `dataset_id`; `ds.datasets[dataset_id].dataset_path` names its source.
    `split` ("95,5,0") divides each source's documents into train/valid/test. A split with a
    zero share returns None.
    """
    weights = resolve_mix(prepared, mix)
    if not isinstance(split, str) or not _SPLIT.match(split) or not any(
        float(x) > 0 for x in split.split(",")
    ):
        raise DataConfigError(
            f"split: expected up to three comma-separated non-negative shares with a positive "
            f"sum, e.g. \"95,5,0\", got {split!r}"
        )
    for field, value in [("seq_length", seq_length), ("train_samples", train_samples),
                         ("valid_samples", valid_samples)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataConfigError(f"{field}: must be an integer >= 0, got {value!r}")
    if seq_length < 1:
        raise DataConfigError(f"seq_length: must be >= 1, got {seq_length}")

    cache_path = os.path.join(os.path.abspath(cache_dir), data_fingerprint(prepared, mix)[:16])
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prepared.prefixes[s] for s in weights], list(weights.values())),
        split=split,
        path_to_cache=cache_path,
        tokenizer=load_tokenizer(prepared.tokenizer_dir),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    builder = _Builder(GPTDataset, [train_samples, valid_samples, 0], lambda: True, config)
    train_ds, valid_ds, _ = builder.build()
    return train_ds, valid_ds
