"""Data-pipeline speed: preprocessing against the tokenizer alone, and batch loading against a step.

    .venv/bin/python benchmarks/data_throughput.py [--docs 20000] [--out benchmarks/results/data_throughput.json]

1. Preprocessing (JSON lines -> dedup -> tokenize -> .bin/.idx, one worker) in tokens/s per core,
   against ``Tokenizer.tokenize_batch`` on the same texts in memory. Goal: the pipeline keeps at
   least 80% of the tokenizer's own throughput.
2. The training data loader (``StepBatches`` over the blended GPTDataset of the demo's main mix):
   time to assemble one step's micro-batches, as a fraction of a tiny_large training step (CPU).

Prints and writes one JSON object (command, git commit, machine, numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from run_record import command, git_commit, machine, write_result  # noqa: E402


def preprocessing(work: Path, docs: int) -> dict:
    from data_pipelines.preprocess import preprocess
    from data_pipelines.synthetic_corpus import GENERATORS, generate_documents
    from data_pipelines.tokenizer import train_bpe

    texts = [t for g in sorted(GENERATORS) for t in generate_documents(g, docs // len(GENERATORS), seed=1)]
    tokenizer = train_bpe(iter(texts[:3000]), 512, work / "tok")
    raw = work / "corpus.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cores = os.cpu_count() or 1

    t0 = time.perf_counter()
    tokens = sum(len(ids) + 1 for ids in tokenizer.tokenize_batch(texts))  # + eod, as preprocessing
    tokenizer_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    report = preprocess([raw], work / "out", work / "tok", workers=1, progress=False)
    pipeline_s = time.perf_counter() - t0
    assert report["tokens"] == tokens, (report["tokens"], tokens)
    return {
        "documents": len(texts),
        "tokens": tokens,
        "cores": cores,
        "tokenizer_tokens_per_s_per_core": tokens / tokenizer_s / cores,
        "pipeline_tokens_per_s_per_core": tokens / pipeline_s / cores,
        "pipeline_fraction_of_tokenizer": tokenizer_s / pipeline_s,
        "goal_fraction": 0.8,
    }


def loader_vs_step(work: Path, steps: int = 20) -> dict:
    """Single-process gloo run of the demo's pretraining setup; times loading and whole steps."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    from launch.config import load_config
    from data_pipelines.gpt_datasets import build_gpt_datasets
    from data_pipelines.prepare import prepare_data
    from megatron_ext import distributed, model_builder, optim
    from megatron_ext.metrics import MetricsWriter
    from megatron_ext.quiet import quiet_known_warnings
    from megatron_ext.trainer import StepBatches, Trainer

    quiet_known_warnings()
    cfg = load_config(["stages.pretrain.train.micro_batch_size=8"])   # as recorded (the preset says null)
    train = cfg.stages.pretrain.train
    env = distributed.initialize(cfg.parallel, int(cfg.seed))
    try:
        prepared = prepare_data(cfg.data, work / "data", int(cfg.seed))
        seq = int(cfg.model.seq_length)
        gbs, mbs = int(train.global_batch_size), int(train.micro_batch_size)
        train_ds, _ = build_gpt_datasets(prepared, cfg.data.mixes.main, seq, steps * gbs, gbs, int(cfg.seed),
                                         cfg.data.split, work / "data" / "cache")
        batches = StepBatches(train_ds, mbs, gbs, 0, env.dp)
        config = model_builder.transformer_config(cfg.model, cfg.parallel)
        chunks = optim.wrap_ddp(model_builder.build_model(cfg.model, config, 512), config, True)
        opt, sched = optim.build_optimizer(train, chunks, bf16=False, use_distributed_optimizer=True)
        trainer = Trainer(chunks, opt, sched, train, batches, None, work / "ckpt",
                          MetricsWriter(work, enabled=False), seq)
        trainer.train_step()  # warm-up
        load_s, step_s = [], []
        for step in range(1, steps):
            t0 = time.perf_counter()
            batches.microbatches(step)
            load_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            trainer.train_step()  # includes its own loading of the same step
            step_s.append(time.perf_counter() - t0)
        load, step = sorted(load_s)[len(load_s) // 2], sorted(step_s)[len(step_s) // 2]
        return {"model": "tiny_large", "global_batch": gbs, "seq_length": seq,
                "median_load_s": load, "median_step_s": step, "load_fraction_of_step": load / step}
    finally:
        distributed.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_throughput.json"))
    args = parser.parse_args()
    from megatron_ext.quiet import quiet_known_warnings

    quiet_known_warnings()
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "command": command(),
            "git_commit": git_commit(),
            "machine": machine(),
            "preprocessing": preprocessing(Path(tmp), args.docs),
            "loader": loader_vs_step(Path(tmp)),
        }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
