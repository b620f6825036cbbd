"""Test worker (run under torchrun, one process): a tiny Hunyuan MoE model and what it computes.

    hunyuan_worker.py <out.pt> [hydra overrides...]

Builds the model from the overrides (fp32 on CPU; norm weights randomised so that their mapping is
tested), then saves with ``torch.save`` into ``<out.pt>``: the model config (resolved ``model``
group), the padded and tokenizer vocab sizes, the single-process ``state_dict`` (``_extra_state``
entries left out), the logits on fixed random tokens and greedy continuations of fixed prompts
(megatron_ext's Generator, KV cache on).
"""

import sys

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from launch.config import load_config
from megatron_ext import distributed, model_builder
from megatron_ext.generation import Generator, SamplingParams
from megatron_ext.mcore_compat import canonical_state_dict
from megatron_ext.quiet import quiet_known_warnings

VOCAB = 100          # tokenizer size; the embedding is padded to 128 rows
BATCH, SEQ = 2, 16
PROMPT_LENGTHS = (5, 9, 3)
NEW_TOKENS = 8


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def main(out: str, *overrides: str) -> None:
    quiet_known_warnings()
    cfg = load_config(["model.seq_length=64", *overrides])
    env = distributed.initialize(cfg.parallel, int(cfg.seed))
    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    padded = model_builder.padded_vocab_size(VOCAB, env.tp)
    (model,) = model_builder.build_model(cfg.model, config, padded)
    model.eval()
    # Norm weights start at 1, where a swapped or misplaced norm (Q vs K, before vs after RoPE, input
    # vs pre-MLP) would go unnoticed: make every one different.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=g))
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    position_ids = torch.arange(SEQ).expand(BATCH, -1)
    with torch.no_grad():
        # No attention mask: the local core attention applies its own causal mask.
        logits = model(tokens, position_ids, None)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS)
    generated = Generator([model], VOCAB, max_batch_size=len(PROMPT_LENGTHS)).generate(prompts(), greedy)
    torch.save({
        "model_cfg": OmegaConf.to_container(cfg.model, resolve=True),
        "vocab": VOCAB,
        "padded_vocab": padded,
        "state_dict": {k: v.detach().clone() for k, v in canonical_state_dict(model).items()},
        "tokens": tokens,
        "logits": logits.detach().clone(),
        "prompts": prompts(),
        "generated": [g.tokens for g in generated],
    }, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
