"""Parameter and KV-cache accounting of a model preset, from the model itself.

    python -m megatron_ext.count_params model=hunyuan_large
    {"total": ..., "activated": ..., "kv_cache_bytes_per_token": ...}

The model is built by the same code as training, on the meta device (no memory is allocated, so the
389B-parameter preset counts in seconds on a laptop), and the numbers are read off its modules:

- ``total``: every parameter (untied input and output embeddings both count).
- ``activated``: what one token uses: routed-expert parameters count ``moe_router_topk /
  num_moe_experts`` of their total; the shared expert, attention, Mamba, norms, router and
  embeddings count fully.
- ``kv_cache_bytes_per_token``: K and V of every attention layer that computes its own K/V (layers
  that reuse another layer's K/V under cross-layer attention add nothing), in the training dtype
  (bf16 on GPUs: 2 bytes). Mamba2 state does not grow with the sequence, so it is not included.

The config tree is read from ``launch/conf`` (files only; ``megatron_ext`` does not import ``launch``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

CONF_DIR = Path(__file__).resolve().parent.parent / "launch" / "conf"
BYTES_PER_KV_ELEMENT = 2  # bf16 KV cache


def count(model: torch.nn.Module, model_cfg: Mapping[str, Any]) -> dict[str, int]:
    from megatron.core.transformer.attention import SelfAttention

    total = routed = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if ".mlp.experts." in name:
            routed += param.numel()
    experts = model_cfg.get("num_moe_experts") or 0
    activated = total - routed + (routed * int(model_cfg.get("moe_router_topk", 1)) // experts if experts else 0)
    kv_bytes = 0
    for module in model.modules():
        if isinstance(module, SelfAttention) and getattr(module, "computes_kv", True):
            head_dim = module.hidden_size_per_attention_head
            kv_bytes += 2 * module.num_query_groups_per_partition * head_dim * BYTES_PER_KV_ELEMENT
    return {"total": total, "activated": activated, "kv_cache_bytes_per_token": kv_bytes}


def count_preset(cfg) -> dict[str, int]:
    """Build ``cfg.model`` on the meta device (single process) and count it."""
    from megatron_ext import distributed, model_builder

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    single = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
              "expert_model_parallel_size": 1, "sequence_parallel": False}
    distributed.initialize(single, seed=0)
    try:
        config = model_builder.transformer_config(cfg.model, single)
        config.perform_initialization = False
        vocab = int(cfg.model.get("vocab_size") or 0)
        if vocab <= 0:
            raise SystemExit("count_params: the preset needs model.vocab_size (the tokenizer's size)")
        with torch.device("meta"):
            (model,) = model_builder.build_model(cfg.model, config, vocab)
        return count(model, cfg.model)
    finally:
        distributed.destroy()


def main(argv: list[str]) -> int:
    from hydra import compose, initialize_config_dir

    from megatron_ext.quiet import quiet_known_warnings

    quiet_known_warnings()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=argv)
    print(json.dumps(count_preset(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
