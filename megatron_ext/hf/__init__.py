"""Hugging Face interoperability: our megatron-core checkpoints to and from ``transformers`` folders.

One adapter module per target format (``hunyuan_v1_moe`` for Hunyuan MoE models, ``nemotron_h`` for
TurboS-style hybrids) maps a single-process model's per-layer parameters to the format's tensors and
back; :mod:`remote_code` exports what those formats cannot represent as our own model classes
(``remote/``, loaded with ``trust_remote_code=True``). The export / import machinery around them
(:mod:`convert`, :mod:`checkpoint_layers`, :mod:`safetensors_shards`) is format-agnostic.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any


@functools.lru_cache(maxsize=1)
def transformer_config_defaults() -> dict[str, Any]:
    """megatron-core's ``TransformerConfig`` defaults: an adapter refuses any model setting away from
    these that it has not reviewed, since an unreviewed knob may change what the model computes."""
    from megatron.core.transformer import TransformerConfig

    out = {}
    for f in dataclasses.fields(TransformerConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out
