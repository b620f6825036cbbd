"""RL rollout generation: our KV-cache ``Generator`` against ``transformers`` ``generate`` on the same weights.

    python benchmarks/rl_generation_hf.py [--batch-sizes 1 8 32] [--prompt-len 256] [--new-tokens 256]
        [--repeats 3] [--out PATH]
    python benchmarks/rl_generation_hf.py --tiny --device cpu --out /tmp/rl_generation_hf.json   # the flow, small

Issue 10 item 4 (goal: our rollouts >= 3x transformers). The model is the MoE shape of
``train_step_mfu.py`` made exportable to ``hunyuan_v1_moe`` (top-2 dropless routing, no CLA, QK-norm
after RoPE): hidden 2048, 16 layers, 16 heads / 8 groups, 16 experts of FFN 2816 plus a shared expert
of 2816, vocabulary 32768; randomly initialised (seeded; norm weights randomised too, so logits are
not flat), bf16 on the GPU (fp32 in the CPU tiny mode). It is saved with our checkpoint code, exported
with ``python -m megatron_ext.hf.convert export`` and loaded with
``AutoModelForCausalLM.from_pretrained``, so both sides run the weights the export really writes.

Per batch size, on the same random-token prompts (all of one length), greedy with no stop tokens so
every row generates all ``--new-tokens``: ``Generator.generate`` as the RL stages call it (KV cache,
``max_batch_size`` = the batch) and ``model.generate(ids, attention_mask, max_new_tokens=N,
min_new_tokens=N, do_sample=False)`` with transformers' defaults (SDPA attention, its default experts
implementation, dynamic cache). Three short warm-up calls (4, 4 and 16 new tokens: megatron-core's
scripted fusions profile, then specialise), then the median of ``--repeats`` full calls; the GPU
queue is drained around each call. Recorded: generated tokens/s of both, their ratio, and how many
greedy tokens agree (first 16 positions / all): bf16 MoE routing can flip near-ties, after which the
continuations part, so agreement is reported, not asserted; the prefill logits' max difference on a
few prompts is the direct check that the two compute the same model. In bf16 both sides' prefill
logits are also compared with transformers' in fp32 on the same exported weights
(``vs_transformers_fp32``), which tells a precision difference from one side computing another model.

CUDA graphs: ``Generator``'s default on a GPU captures the decode step once per batch and replays it
(:mod:`megatron_ext.decode_graph`; the prefill and sampling stay eager). ``ours_eager`` is the same
``Generator`` with ``static_decode=False`` (every step launched from Python), for the graph's share;
its greedy agreement with ``ours`` is recorded too (same weights and kernels up to the masked
whole-cache attention of the captured step).

Writes ``benchmarks/results/rl_generation_hf_<device>.json`` on a GPU (``--out`` elsewhere) and prints
a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EXPORTABLE = ["model=tiny_large", "model.cla_share_factor=1", "model.moe_router_topk=2",
              "model.moe_routing_mode=dropless", "model.moe_expert_capacity_factor=null",
              "model.qk_norm_after_rope=true"]
MOE = [*EXPORTABLE, "model.num_layers=16", "model.hidden_size=2048", "model.num_attention_heads=16",
       "model.num_query_groups=8", "model.ffn_hidden_size=2816", "model.num_moe_experts=16",
       "model.moe_ffn_hidden_size=2816", "model.moe_shared_expert_intermediate_size=2816",
       "model.vocab_size=32768"]
TINY = EXPORTABLE   # tiny_large: 4 layers, hidden 64, 4 experts, vocabulary 512
LOGITS_PROMPTS = 4   # prompts in the prefill-logits comparison
# New tokens of the untimed warm-up calls: three calls of two lengths, so that the prefill shape too
# has run past TorchScript's profiling runs (megatron-core's ``jit_fuser`` functions specialise on
# their third call: seen here as a one-off 1 s call) before the timed calls.
WARMUP_TOKENS = (4, 4, 16)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny_large-sized model, few prompts and tokens")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default 1 8 32 (tiny: 1 2)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 256 (tiny: 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256 (tiny: 8)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (tiny: 1)")
    parser.add_argument("--workdir", default=None, help="where the checkpoint and the export go (a temp dir)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/rl_generation_hf_<device>.json")
    args = parser.parse_args()
    defaults = ([1, 2], 8, 8, 1) if args.tiny else ([1, 8, 32], 256, 256, 3)
    for name, value in zip(("batch_sizes", "prompt_len", "new_tokens", "repeats"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, repeats: int, device, new_tokens: int):
    """(median seconds, all timed seconds, last result) of ``repeats`` calls of ``fn(None)`` (all
    ``new_tokens``) after short warm-up calls of the same batch and prompts (:data:`WARMUP_TOKENS`)."""
    for n in WARMUP_TOKENS:
        fn(min(n, new_tokens))
    seconds, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn(None)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), seconds, out


def _peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _randomise_norms(chunks, seed: int) -> None:
    """Norm weights 1 + 0.3 N(0, 1): random-init logits are otherwise nearly flat (ties everywhere)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in chunks[0].named_parameters():
            if "norm" in name:
                param.copy_((1 + 0.3 * torch.randn(param.shape, generator=g)).to(param.dtype))


def _export(chunks, model_cfg, work: Path, dtype_name: str) -> tuple[Path, dict]:
    """Save with our checkpoint code, export with the converter's command line; returns the HF folder
    and the seconds each took."""
    from omegaconf import OmegaConf

    from megatron_ext import checkpointing

    t0 = time.perf_counter()
    checkpointing.save(work / "ours", 0, chunks)
    OmegaConf.save(model_cfg, work / "model.yaml", resolve=True)
    t1 = time.perf_counter()
    hf_dir = work / "hf"
    # The converter starts its own one-process group (not on this process's port), on the host: it is a
    # CPU tool (one layer at a time), and its CPU path is the one its tests cover.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "megatron_ext.hf.convert", "export", str(work / "ours" / "iter_0000000"),
           str(hf_dir), "--model-config", str(work / "model.yaml"), "--dtype", dtype_name]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"export failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return hf_dir, {"save_s": t1 - t0, "export_s": time.perf_counter() - t1}


def _agreement(ours, theirs) -> dict:
    """Greedy tokens [b, N] of the two: the fraction equal in the first 16 positions and in all, and
    the mean index of the first difference (N where a row agrees throughout)."""
    import torch

    same = ours == theirs
    n = same.shape[1]
    first_diff = torch.where(same.all(dim=1), n, (~same).float().argmax(dim=1))
    return {"first16": same[:, :16].float().mean().item(), "all": same.float().mean().item(),
            "mean_first_difference": first_diff.float().mean().item()}


def _generate_fns(chunks, vocab: int, hf, prompts, new_tokens: int, suppress):
    """``fn(n)`` for each side: greedy continuations [b, n] (n = None: ``new_tokens``) of ``prompts``."""
    import torch

    from megatron_ext.generation import Generator, SamplingParams

    gen = Generator(chunks, vocab, max_batch_size=prompts.shape[0], use_cache=True)
    eager = Generator(chunks, vocab, max_batch_size=prompts.shape[0], use_cache=True, static_decode=False)
    as_lists = prompts.tolist()
    input_ids = prompts.to(next(hf.parameters()).device)
    attention_mask = torch.ones_like(input_ids)
    prompt_len = prompts.shape[1]

    def with_generator(generator):
        def ours(n: int | None):
            n = n or new_tokens
            got = generator.generate(as_lists, SamplingParams(temperature=0.0, max_new_tokens=n, stop_token_ids=()))
            assert all(len(o.tokens) == n for o in got)
            return torch.tensor([o.tokens for o in got])
        return ours

    def theirs(n: int | None):
        n = n or new_tokens
        with torch.no_grad():
            got = hf.generate(input_ids, attention_mask=attention_mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, suppress_tokens=suppress)
        assert got.shape[1] == prompt_len + n
        return got[:, prompt_len:].cpu()

    return {"ours": with_generator(gen), "ours_eager": with_generator(eager), "transformers": theirs}, gen


def main() -> None:
    args = _parse()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""   # before torch: the CPU backend then takes over
    from benchmarks.run_record import (
        command,
        git_commit,
        gpu_record,
        gpu_result_path,
        machine,
        single_rank_env,
        write_result,
    )

    single_rank_env()
    import torch

    from launch.config import load_config
    from megatron_ext import distributed, model_builder
    from megatron_ext.quiet import quiet_known_warnings

    quiet_known_warnings()
    prompt_len, new_tokens = args.prompt_len, args.new_tokens
    cfg = load_config([*(TINY if args.tiny else MOE), f"model.seq_length={prompt_len + new_tokens}"])
    env = distributed.initialize(cfg.parallel, seed=0)
    device = torch.device("cpu" if env.cpu else "cuda")
    if args.device == "cuda" and device.type != "cuda":
        raise SystemExit("no GPU here: run with --device cpu (and --tiny)")
    vocab = int(cfg.model.vocab_size)
    padded = model_builder.padded_vocab_size(vocab, 1)
    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    t0 = time.perf_counter()
    chunks = model_builder.build_model(cfg.model, config, padded)
    _randomise_norms(chunks, seed=5)
    phases = {"build_s": time.perf_counter() - t0}
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    g = torch.Generator().manual_seed(1234)
    prompts = torch.randint(1, vocab, (max(args.batch_sizes), prompt_len), generator=g)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        hf_dir, export_phases = _export(chunks, cfg.model, Path(tmp), str(dtype).removeprefix("torch."))
        phases.update(export_phases)
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
        phases["hf_load_s"] = time.perf_counter() - t0
        k = min(LOGITS_PROMPTS, prompts.shape[0])
        reference = None
        if dtype != torch.float32:   # the exported weights in fp32: which bf16 side strays from them
            hf32 = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
            with torch.no_grad():
                reference = hf32(prompts[:k].to(device)).logits[..., :vocab].float()
            del hf32
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"{n_params / 1e9:.2f}B parameters ({dtype}); " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()),
          flush=True)
    hf.generation_config.eos_token_id = None   # no stop tokens: every row generates all tokens
    hf.generation_config.pad_token_id = 0
    suppress = list(range(vocab, padded)) or None   # ours never samples the padded vocabulary
    hf_impl = {"attention": hf.config._attn_implementation,
               "experts": getattr(hf.config, "_experts_implementation", None)}

    # Same model? Prefill logits of a few prompts, through each side's plain forward.
    ids = prompts[:k].to(device)
    chunks[0].eval()
    with torch.no_grad():
        ours_logits = chunks[0](ids, torch.arange(prompt_len, device=device).expand(k, -1), None)[..., :vocab]
        hf_logits = hf(ids).logits[..., :vocab]
    logits_check = {"prompts": k, "max_abs_diff": (ours_logits.float() - hf_logits.float()).abs().max().item(),
                    "max_abs_logit": ours_logits.float().abs().max().item(),
                    "argmax_agreement": (ours_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean().item()}
    if reference is not None:
        logits_check["vs_transformers_fp32"] = {
            side: {"max_abs_diff": (got.float() - reference).abs().max().item(),
                   "mean_abs_diff": (got.float() - reference).abs().mean().item(),
                   "argmax_agreement": (got.argmax(-1) == reference.argmax(-1)).float().mean().item()}
            for side, got in (("ours", ours_logits), ("transformers", hf_logits))}
    del ours_logits, hf_logits

    import transformers

    record = gpu_record() if device.type == "cuda" else {
        "command": command(), "commit": git_commit(), "machine": machine(), "device": "cpu",
        "torch": torch.__version__}
    rows: list[dict] = []
    result = {
        **record,
        "transformers": transformers.__version__,
        "model": {"tiny": args.tiny, "overrides": TINY if args.tiny else MOE, "params": n_params,
                  "dtype": str(dtype).removeprefix("torch."), "vocab_size": vocab, "padded_vocab_size": padded},
        "settings": {"prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": args.repeats,
                     "warmup_new_tokens": list(WARMUP_TOKENS),
                     "sampling": "greedy, no stop tokens, random-token prompts of one length",
                     "peak_memory": "torch.cuda.max_memory_allocated during one side's calls; both models' "
                                    "weights stay resident throughout, so each side's peak counts both"},
        "ours": {"generator": "megatron_ext.generation.Generator, use_cache=True, max_batch_size=batch "
                              "(also computes each token's log-prob, as RL needs)",
                 "cuda_graphs": "decode step captured once per batch where megatron_ext.decode_graph allows "
                                "(row: ours_cuda_graphs); ours_eager: static_decode=False"},
        "transformers_generate": {**hf_impl, "cache": "default (dynamic)", "compile": False},
        "phases": phases,
        "prefill_logits": logits_check,
        "results": rows,
    }
    out = Path(args.out) if args.out else (gpu_result_path("rl_generation_hf") if device.type == "cuda"
                                           else REPO / "benchmarks" / "results" / "rl_generation_hf_cpu.json")
    for batch in args.batch_sizes:
        batch_prompts = prompts[:batch]
        sides, gen = _generate_fns(chunks, vocab, hf, batch_prompts, new_tokens, suppress)
        row = {"batch_size": batch, "ours_cuda_graphs": gen.decode_graphs}
        tokens = {}
        for name, fn in sides.items():
            _reset_peak(device)
            median, seconds, tokens[name] = _timed(fn, args.repeats, device, new_tokens)
            row[name] = {"median_s": median, "seconds": seconds, "tokens_per_s": batch * new_tokens / median,
                         "peak_memory_gib": _peak_gib(device)}
        row["speedup"] = row["ours"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
        row["speedup_vs_ours_eager"] = row["ours"]["tokens_per_s"] / row["ours_eager"]["tokens_per_s"]
        row["greedy_agreement"] = _agreement(tokens["ours"], tokens["transformers"])
        row["greedy_agreement_ours_eager"] = _agreement(tokens["ours"], tokens["ours_eager"])
        rows.append(row)
        write_result(out, result)   # after every batch size: a run cut short keeps what it measured
        print(f"batch {batch:3d}: ours {row['ours']['tokens_per_s']:9.1f} tok/s (graphs {gen.decode_graphs}; eager "
              f"{row['ours_eager']['tokens_per_s']:.1f}), transformers "
              f"{row['transformers']['tokens_per_s']:9.1f} tok/s, {row['speedup']:.2f}x; greedy agreement "
              f"first16 {row['greedy_agreement']['first16']:.3f} all {row['greedy_agreement']['all']:.3f}",
              flush=True)
    distributed.destroy()
    summary = ", ".join(f"b{r['batch_size']} {r['ours']['tokens_per_s']:.0f} vs {r['transformers']['tokens_per_s']:.0f} "
                        f"tok/s ({r['speedup']:.2f}x, agree16 {r['greedy_agreement']['first16']:.2f})" for r in rows)
    print(json.dumps({"summary": f"rl_generation_hf {'tiny ' if args.tiny else ''}{record['device']}: {summary}; "
                                 f"prefill logits max diff {logits_check['max_abs_diff']:.3g}", "out": str(out)}))


if __name__ == "__main__":
    main()
