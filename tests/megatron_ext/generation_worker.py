"""Test worker (run under torchrun): generate from a tiny preset model under a parallel layout.

    generation_worker.py <out.json> <ckpt_root> <mode> [hydra overrides...]

Modes:
- ``reference`` (one process): random init, save the weights as step 0 of ``<ckpt_root>``, then
  generate from fixed prompts of different lengths: greedy with and without the KV cache, and sampled;
  and both again with the static decode step where the model allows it.
- ``layout``: load those weights under the configured layout (TP / PP / EP ...) and generate the same,
  and greedily once more with the prompts split over the data-parallel ranks.

Writes (rank 0) the generated tokens, log-probs and finished flags per run as JSON.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from launch.config import load_config
from megatron_ext import checkpointing, distributed, model_builder
from megatron_ext.errors import ConfigError
from megatron_ext.generation import Generator, SamplingParams
from megatron_ext.quiet import quiet_known_warnings

VOCAB = 96
PROMPT_LENGTHS = (5, 9, 3, 7, 12)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def run(gen: Generator, params: SamplingParams, seed: int = 0, sharded: bool = False) -> dict:
    out = (gen.generate_sharded if sharded else gen.generate)(prompts(), params, seed=seed)
    return {"tokens": [g.tokens for g in out], "logprobs": [g.logprobs for g in out],
            "finished": [g.finished for g in out]}


def main(out: str, ckpt_root: str, mode: str, *overrides: str) -> None:
    quiet_known_warnings()
    cfg = load_config(["model.seq_length=64", *overrides])
    env = distributed.initialize(cfg.parallel, int(cfg.seed))
    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    chunks = model_builder.build_model(cfg.model, config, model_builder.padded_vocab_size(VOCAB, env.tp))
    root = Path(ckpt_root)
    if mode == "reference":
        checkpointing.save(root, 0, chunks)
    else:
        checkpointing.load(checkpointing.iteration_dir(root, 0), chunks)
    # Stop on token 56 (which the reference model emits greedily); others run to max_new_tokens.
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(56,))
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, stop_token_ids=(56,))
    result = {
        "greedy_cached": run(Generator(chunks, VOCAB, max_batch_size=3), greedy),
        "greedy_cached_one_batch": run(Generator(chunks, VOCAB, max_batch_size=8), greedy),
        "sampled": run(Generator(chunks, VOCAB, max_batch_size=3), sampled, seed=5),
    }
    if mode == "layout":
        # Data-parallel ranks take different prompts (lengths differ): with sharded experts they must
        # still run the same forwards.
        result["greedy_sharded"] = run(Generator(chunks, VOCAB, max_batch_size=2), greedy, sharded=True)
    if mode == "reference":
        result["greedy_uncached"] = run(Generator(chunks, VOCAB, max_batch_size=3, use_cache=False), greedy)
        gen = Generator(chunks, VOCAB, max_batch_size=3)
        result["sampled_again"] = run(gen, sampled, seed=5)
        result["sampled_other_seed"] = run(gen, sampled, seed=6)
        result["stats"] = gen.stats.as_dict()
        # the fixed-buffer decode step (megatron_ext.decode_graph), eager here; auto picks it only
        # where a CUDA graph can be captured
        result["static_by_default"] = Generator(chunks, VOCAB).static_decode
        try:
            static = Generator(chunks, VOCAB, max_batch_size=3, static_decode=True)
        except ConfigError as refused:
            result["static_refused"] = str(refused)
        else:
            result["greedy_static"] = run(static, greedy)
            result["sampled_static"] = run(static, sampled, seed=5)
            result["static_decode_kinds"] = sorted({b["decode"] for b in static.stats.per_batch})
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
