"""The CUDA-graph decode step against eager decoding on a GPU, for both model families.

    TURBOLASER_MAMBA_SCAN=eager python benchmarks/decode_graph_check.py [--batch 8 --prompt-len 16 --new-tokens 32]

The tiny presets as they are (Hunyuan: CLA, top-1 recycle routing with capacity; TurboS: attention,
Mamba2 and top-2 MoE layers), bf16 on the GPU, randomly initialised with randomised norm weights
(flat logits would tie everywhere). The same ``Generator`` settings twice on the same prompts, greedy
without stop tokens: the default (decode step captured as a CUDA graph, :mod:`megatron_ext.decode_graph`)
and ``static_decode=False`` (every step launched from Python). Records whether the graph was captured,
the fraction of equal tokens, the mean first differing position, the largest log-prob difference on
the positions before a row's first difference, and both tokens/s (median of 3 calls after a warm-up).
``TURBOLASER_MAMBA_SCAN=eager`` skips compiling the prefill's Mamba scan (not what is checked here).
Writes benchmarks/results/decode_graph_check_<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import gpu_record, gpu_result_path, single_rank_env, write_result  # noqa: E402


def compare(graphed, eager, new_tokens: int) -> dict:
    equal, first_diffs, logprob_diff = 0, [], 0.0
    for g, e in zip(graphed, eager):
        same = [a == b for a, b in zip(g.tokens, e.tokens)]
        first = same.index(False) if False in same else len(same)
        equal += sum(same)
        first_diffs.append(first)
        if first:
            logprob_diff = max(logprob_diff, max(abs(a - b) for a, b in zip(g.logprobs[:first], e.logprobs[:first])))
    return {"token_agreement": equal / (len(graphed) * new_tokens),
            "mean_first_difference": statistics.mean(first_diffs),
            "max_logprob_diff_before_first_difference": logprob_diff}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark checks CUDA graphs"
    single_rank_env()
    from benchmarks.rl_generation_hf import _randomise_norms
    from launch.config import load_config
    from megatron_ext import distributed, model_builder
    from megatron_ext.generation import Generator, SamplingParams
    from megatron_ext.quiet import quiet_known_warnings

    quiet_known_warnings()
    result = {**gpu_record(), "settings": vars(args), "models": {}}
    env = None
    for preset in ("tiny_large", "tiny_turbos"):
        cfg = load_config([f"model={preset}", f"model.seq_length={args.prompt_len + args.new_tokens}"])
        env = env or distributed.initialize(cfg.parallel, seed=0)
        vocab = int(cfg.model.vocab_size)
        config = model_builder.transformer_config(cfg.model, cfg.parallel)
        chunks = model_builder.build_model(cfg.model, config, model_builder.padded_vocab_size(vocab, 1))
        _randomise_norms(chunks, seed=5)
        prompts = torch.randint(1, vocab, (args.batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(1)).tolist()
        params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
        row = {}
        outputs = {}
        for name, static in (("graph", None), ("eager", False)):
            gen = Generator(chunks, vocab, max_batch_size=args.batch, static_decode=static)
            gen.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=4))   # warm-up
            seconds = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                outputs[name] = gen.generate(prompts, params)
                torch.cuda.synchronize()
                seconds.append(time.perf_counter() - t0)
            row[name] = {"decode": gen.stats.per_batch[-1]["decode"],
                         "tokens_per_s": args.batch * args.new_tokens / statistics.median(seconds)}
        row.update(compare(outputs["graph"], outputs["eager"], args.new_tokens))
        row["speedup"] = row["graph"]["tokens_per_s"] / row["eager"]["tokens_per_s"]
        result["models"][preset] = row
        print(preset, row, flush=True)
    write_result(gpu_result_path("decode_graph_check"), result)
    assert all(r["graph"]["decode"] == "graph" for r in result["models"].values()), "a decode step was not captured"
    distributed.destroy()


if __name__ == "__main__":
    main()
