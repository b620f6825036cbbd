"""Generation speed: generated tokens/s with the KV cache against full recompute, per batch size.

    .venv/bin/python benchmarks/generation_throughput.py [--models tiny_large tiny_turbos]
        [--batch-sizes 1 8 32] [--prompt-len 32] [--new-tokens 64] [--repeats 3]
        [--out benchmarks/results/generation_throughput.json]

For each tiny preset model (randomly initialised; speed does not depend on the weights) and batch
size, ``Generator.generate`` runs greedily (temperature 0, no stop tokens, so every row produces all
``--new-tokens``) once with ``use_cache=True`` (attention KV cache, Mamba states) and once with
``use_cache=False`` (the whole prefix re-run every step). One warm-up call, then the median of
``--repeats`` timed calls. The cache's speed-up is the ratio of the two throughputs.

Runs in this one process: the process group is started by ``megatron_ext.distributed.initialize``
from a single-rank environment, as the data benchmark does. Prints a table and writes one JSON object
(command, git commit, machine, numbers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from run_record import command, git_commit, machine, single_rank_env, write_result  # noqa: E402


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(batch)
    return torch.randint(1, vocab, (batch, length), generator=g).tolist()


def _time_generate(gen, prompts, params, repeats: int) -> tuple[float, int]:
    """Median seconds of ``repeats`` calls after one warm-up, and forward steps per call."""
    gen.generate(prompts, params)  # warm-up
    seconds = []
    steps_before = gen.stats.forward_steps
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = gen.generate(prompts, params)
        seconds.append(time.perf_counter() - t0)
        assert all(len(g.tokens) == params.max_new_tokens for g in out)
    return statistics.median(seconds), (gen.stats.forward_steps - steps_before) // repeats


def model_throughput(model: str, batch_sizes: list[int], prompt_len: int, new_tokens: int,
                     repeats: int) -> dict:
    from launch.config import load_config
    from megatron_ext import model_builder
    from megatron_ext.generation import Generator, SamplingParams

    cfg = load_config([f"model={model}", f"model.seq_length={prompt_len + new_tokens}"])
    vocab = int(cfg.model.vocab_size)
    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    chunks = model_builder.build_model(cfg.model, config, model_builder.padded_vocab_size(vocab, 1))
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, stop_token_ids=())
    rows = []
    for batch in batch_sizes:
        prompts = _prompts(batch, prompt_len, vocab)
        row = {"batch_size": batch}
        for name, use_cache in (("cached", True), ("recompute", False)):
            gen = Generator(chunks, vocab, max_batch_size=batch, use_cache=use_cache)
            seconds, steps = _time_generate(gen, prompts, params, repeats)
            row[name] = {"median_s": seconds, "tokens_per_s": batch * new_tokens / seconds,
                         "forward_steps": steps}
        row["cache_speedup"] = row["cached"]["tokens_per_s"] / row["recompute"]["tokens_per_s"]
        rows.append(row)
        print(f"{model:12s} batch {batch:3d}: cached {row['cached']['tokens_per_s']:9.1f} tok/s, "
              f"recompute {row['recompute']['tokens_per_s']:9.1f} tok/s, "
              f"speed-up {row['cache_speedup']:.2f}x", flush=True)
    return {"model": model, "num_layers": int(cfg.model.num_layers), "hidden_size": int(cfg.model.hidden_size),
            "results": rows}


def _table(models: list[dict]) -> str:
    lines = ["| model | batch | cached tok/s | recompute tok/s | cache speed-up |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for m in models:
        for r in m["results"]:
            lines.append(f"| {m['model']} | {r['batch_size']} | {r['cached']['tokens_per_s']:.0f} | "
                         f"{r['recompute']['tokens_per_s']:.0f} | {r['cache_speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny_large", "tiny_turbos"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generation_throughput.json"))
    args = parser.parse_args()

    single_rank_env(29518)  # one rank, started here rather than by torchrun
    import torch

    from launch.config import load_config
    from megatron_ext import distributed
    from megatron_ext.quiet import quiet_known_warnings

    quiet_known_warnings()
    cfg = load_config([])
    distributed.initialize(cfg.parallel, int(cfg.seed))
    try:
        models = [model_throughput(m, args.batch_sizes, args.prompt_len, args.new_tokens, args.repeats)
                  for m in args.models]
    finally:
        distributed.destroy()
    result = {
        "command": command(),
        "git_commit": git_commit(),
        "machine": {**machine(), "torch_threads": torch.get_num_threads()},
        "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "sampling": "greedy, no stop tokens"},
        "models": models,
    }
    write_result(args.out, result)
    print(_table(models))


if __name__ == "__main__":
    main()
