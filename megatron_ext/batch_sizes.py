"""The micro-batch size of a stage: ``train.micro_batch_size``, or when null the largest the layout
allows.

Null means one micro-batch per data-parallel rank and pipeline stage: ``global_batch_size / (DP x PP)``
(pipeline parallelism needs at least PP micro-batches in flight). It suits small models, whose step
time is mostly per-micro-batch overhead (tiny_large pretraining on the 2-core dev box: 0.26 s per step
with 2 micro-batches of 8, 0.19 s with one of 16, same data and loss), and it keeps holding when the
layout changes (DP2 halves it); the tiny presets use it. Real-size presets set a number that fits in
memory.
"""

from __future__ import annotations

from typing import Any, Mapping

from megatron_ext.errors import ConfigError


def micro_batch_size(train: Mapping[str, Any], dp: int, pp: int = 1, prefix: str = "train") -> int:
    value = train.get("micro_batch_size")
    if value is not None:
        return int(value)
    gbs, ranks = int(train["global_batch_size"]), int(dp) * int(pp)
    if gbs % ranks:
        raise ConfigError(
            f"{prefix}.micro_batch_size=null takes global_batch_size / (data-parallel x pipeline-parallel "
            f"size), but global_batch_size={gbs} is not a multiple of {dp} x {pp}; set micro_batch_size "
            f"or a global_batch_size that is (e.g. {ranks * max(1, gbs // ranks)})"
        )
    return gbs // ranks
