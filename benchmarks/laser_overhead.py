"""LaSeR's training cost against plain GRPO: one micro-step (forward, loss, backward) on the same rollout.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/laser_overhead.py [--models tiny_large tiny_turbos]
        [--batch 16] [--seq-length 256] [--warmup 1] [--repeats 9]
        [--prompt-tokens 24 40] [--response-tokens 120 180] [--packed-multiple 1] [--device cpu|cuda]
        [--override model.hidden_size=2048 ...] [--out benchmarks/results/laser_overhead.json]

LaSeR (arXiv 2510.14943) claims its self-reward costs one token: z_c is appended after each finished
response and its log-prob, read from logits the policy-gradient loss already computes, feeds a small
MSE term. This measures that claim against the goal of under 2% of step time. For each tiny preset
(randomly initialised; speed does not depend on the weights) one synthetic rollout of ``--batch``
finished sequences (prompt 24-40 tokens, response 120-180 tokens, fixed seed) is trained on as:

- ``grpo``: ``settings.laser=False``, no z_c token (``zc_mask`` all zero);
- ``laser``: ``settings.laser=True``, z_c appended after the response (one more label, marked in
  ``zc_mask``), the MSE term active (``step`` past the warm-up).

and in two layouts:

- ``padded``: rows right-padded to ``--seq-length``, as ``RolloutBatches`` serves them. The extra
  token only fills a pad slot, so both variants run on tensors of the same shape;
- ``packed``: rows padded only to the longest sequence of the batch (+1 position for LaSeR), so the
  one extra position per row is in the tensors and its cost shows. ``--packed-multiple N`` rounds each
  variant's packed length up to a multiple of N (as a packer that keeps GPU matrix shapes aligned
  would; default 1, no rounding): the extra position then costs nothing unless it crosses a multiple.

A micro-step is ``logits = model(tokens, position_ids)``, :func:`posttrain.rl_rollouts.rl_loss`
(token-level GRPO + K3 KL, plus LaSeR's MSE), ``loss.backward()``; the optimizer is excluded (it is
the same for both variants). Variants run interleaved within each repeat, so slow drift of the shared
box hits all of them alike; after ``--warmup`` rounds the median of ``--repeats`` is reported, with
the median of the per-round LaSeR/GRPO ratios and the same from process CPU time (less sensitive to
other load on a shared box). The
loss alone (``rl_loss`` forward + backward on fixed logits) is also timed, to isolate the MSE term.

Runs in this one process (a single-rank process group from ``megatron_ext.distributed.initialize``).
Prints a table and writes one JSON object (command, git commit, machine, numbers).

``--device cuda`` runs the same micro-step on the first GPU: ``distributed.initialize`` then leaves
the CPU backend off (it switches on only without CUDA), so ``model_builder.transformer_config`` gives
bf16 parameters; the model, built on the host (``use_cpu_initialization``), is moved to the GPU here,
and each timed step is bracketed by ``torch.cuda.synchronize()``. ``--override`` takes Hydra
overrides applied after ``model=<preset>`` (e.g. ``model.hidden_size=2048 model.vocab_size=128512``),
so a GPU run can time a larger model of a tiny preset's family; ``--prompt-tokens`` /
``--response-tokens`` set the synthetic lengths to match a longer ``--seq-length``. tiny_turbos'
Mamba2 layers are skipped on CUDA unless ``mamba_ssm`` is importable (the pure-torch stand-in,
:mod:`megatron_ext.models.mamba_torch`, would time the stand-in rather than the real kernels).
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

VARIANTS = (("padded", "grpo"), ("padded", "laser"), ("packed", "grpo"), ("packed", "laser"))


def _settings(laser: bool):
    from posttrain.rl_rollouts import RLSettings

    # rl_stem's loss settings; the sampling-only fields do not enter the loss
    return RLSettings(groups=4, group_size=4, epochs=1, max_sampling_rounds=1, clip_eps=0.2, clip_eps_high=0.28,
                      kl_coef=0.01, temperature=1.0, thinking=None, laser=laser, laser_alpha=0.1, laser_beta=0.1,
                      laser_coef=0.1, laser_std_threshold=0.1, laser_loss_warmup=0, laser_adv_warmup=0,
                      c_ref=-6.2)


def _rollout(batch: int, vocab: int, zc_id: int, prompt_tokens: tuple[int, int] = (24, 40),
             response_tokens: tuple[int, int] = (120, 180)) -> list[tuple[list[int], list[int], float]]:
    """(prompt, response, verifier reward) per sequence; every response finished, so each gets z_c.
    Lengths are uniform in the inclusive ranges ``prompt_tokens`` and ``response_tokens``."""
    import torch

    g = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(batch):
        p = int(torch.randint(prompt_tokens[0], prompt_tokens[1] + 1, (), generator=g))
        r = int(torch.randint(response_tokens[0], response_tokens[1] + 1, (), generator=g))
        ids = torch.randint(1, zc_id, (p + r,), generator=g).tolist()  # z_c never appears elsewhere
        rows.append((ids[:p], ids[p:], float(torch.randint(0, 2, (), generator=g))))
    return rows


def _batch(rollout, laser: bool, length: int, zc_id: int, pad: int) -> dict:
    """Rows laid out as ``RolloutBatches._row`` does, padded to ``length``; loss scales as ``_prepare``."""
    import torch

    from posttrain import laser as laser_mod

    n = len(rollout)
    tokens = torch.full((n, length), pad, dtype=torch.long)
    labels = torch.full((n, length), pad, dtype=torch.long)
    response = torch.zeros(n, length)
    zc = torch.zeros(n, length)
    for i, (prompt, resp, _) in enumerate(rollout):
        ids = prompt + resp + ([zc_id] if laser else [])
        assert len(ids) - 1 <= length, (len(ids), length)
        tokens[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        labels[i, :len(ids) - 1] = torch.tensor(ids[1:])
        p, r = len(prompt), len(resp)
        response[i, p - 1:p - 1 + r] = 1.0
        if laser:
            zc[i, p - 1 + r] = 1.0
    rewards = torch.tensor([x[2] for x in rollout])
    finished = torch.ones(n, dtype=torch.bool)
    g = torch.Generator().manual_seed(3)
    return {
        "tokens": tokens, "labels": labels, "position_ids": torch.arange(length).expand(n, length),
        "response_mask": response, "zc_mask": zc, "rewards": rewards,
        "advantages": torch.randn(n, generator=g),
        "laser_weight": laser_mod.self_reward_weights(rewards.double(), finished).float(),
        "c_ref": torch.full((n,), -6.2),
        "loss_scale": torch.full((n,), 1.0 / float(response.sum())),
        "laser_scale": torch.full((n,), 1.0 / n),
    }


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _step(model, batch: dict, settings, cuda: bool = False) -> tuple[float, float]:
    """One timed micro-step: forward, rl_loss, backward (gradients cleared beforehand, untimed).
    Wall seconds and this process's CPU seconds (the latter less sensitive to other load on the box).
    On CUDA the GPU is synchronised before the clock starts and before it stops."""
    from posttrain.rl_rollouts import rl_loss

    model.zero_grad(set_to_none=True)
    _sync(cuda)
    t0, c0 = time.perf_counter(), time.process_time()
    logits = model(batch["tokens"], batch["position_ids"], None)
    loss, _ = rl_loss(logits, batch, settings, step=1, sink={})
    loss.backward()
    _sync(cuda)
    return time.perf_counter() - t0, time.process_time() - c0


def _loss_only(logits, batch: dict, settings, repeats: int, cuda: bool = False) -> float:
    """Median seconds of rl_loss forward + backward on fixed logits (no model)."""
    from posttrain.rl_rollouts import rl_loss

    seconds = []
    for _ in range(repeats + 2):
        leaf = logits.detach().requires_grad_(True)
        _sync(cuda)
        t0 = time.perf_counter()
        loss, _ = rl_loss(leaf, batch, settings, step=1, sink={})
        loss.backward()
        _sync(cuda)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds[2:])


def model_overhead(name: str, batch_size: int, seq_length: int, warmup: int, repeats: int,
                   device: str = "cpu", overrides: list[str] | tuple[str, ...] = (),
                   prompt_tokens: tuple[int, int] = (24, 40), response_tokens: tuple[int, int] = (120, 180),
                   packed_multiple: int = 1) -> dict:
    import torch
    from megatron.core.transformer.moe.moe_utils import (
        get_moe_layer_wise_logging_tracker,
    )

    from launch.config import load_config
    from megatron_ext import model_builder
    from posttrain.rl_rollouts import token_logprobs_parallel

    # megatron-core's MoE aux-loss log is global and sized by the first model's layer count
    get_moe_layer_wise_logging_tracker().clear()
    cuda = device == "cuda"
    cfg = load_config([f"model={name}", f"model.seq_length={seq_length}", *overrides])
    vocab = int(cfg.model.vocab_size)
    zc_id, pad = vocab - 1, 0  # stand-ins for the reserved self-reward token and the pad id
    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    model = model_builder.build_model(cfg.model, config, model_builder.padded_vocab_size(vocab, 1))[0]
    if cuda:  # built on the host (use_cpu_initialization); nothing in the builder moves it
        model.cuda(torch.cuda.current_device())
    model.train()
    params = sum(p.numel() for p in model.parameters())
    param_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    rollout = _rollout(batch_size, vocab, zc_id, prompt_tokens, response_tokens)
    longest = max(len(p) + len(r) for p, r, _ in rollout) - 1  # label positions of the longest row

    def packed(n: int) -> int:
        return -(-n // packed_multiple) * packed_multiple

    lengths = {"padded": {"grpo": seq_length, "laser": seq_length},
               "packed": {"grpo": packed(longest), "laser": packed(longest + 1)}}
    settings = {"grpo": _settings(False), "laser": _settings(True)}
    batches = {}
    for layout, variant in VARIANTS:
        b = _batch(rollout, variant == "laser", lengths[layout][variant], zc_id, pad)
        if cuda:
            b = {k: v.cuda() for k, v in b.items()}
        with torch.no_grad():  # behaviour / reference log-probs, as the rollout records them
            logp = token_logprobs_parallel(model(b["tokens"], b["position_ids"], None), b["labels"], 1.0)
        b["old_logp"], b["ref_logp"] = logp, logp - 0.05
        batches[(layout, variant)] = b

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    wall = {key: [] for key in VARIANTS}
    cpu = {key: [] for key in VARIANTS}
    for round_ in range(warmup + repeats):
        order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
        for key in order:
            w, c = _step(model, batches[key], settings[key[1]], cuda)
            if round_ >= warmup:
                wall[key].append(w)
                cpu[key].append(c)

    with torch.no_grad():
        b = batches[("padded", "laser")]
        logits = model(b["tokens"], b["position_ids"], None)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    loss_grpo = _loss_only(logits, batches[("padded", "grpo")], settings["grpo"], repeats, cuda)
    loss_laser = _loss_only(logits, b, settings["laser"], repeats, cuda)

    layouts = {}
    for layout in ("padded", "packed"):
        g, l = wall[(layout, "grpo")], wall[(layout, "laser")]
        gc, lc = cpu[(layout, "grpo")], cpu[(layout, "laser")]
        r = {
            "seq_length": lengths[layout],
            "grpo_ms": 1e3 * statistics.median(g), "laser_ms": 1e3 * statistics.median(l),
            "overhead_pct": 100 * (statistics.median(l) / statistics.median(g) - 1),
            # each round runs both variants back to back: the median of the per-round ratios
            "paired_overhead_pct": 100 * (statistics.median(b / a for a, b in zip(g, l)) - 1),
            "grpo_min_ms": 1e3 * min(g), "laser_min_ms": 1e3 * min(l),
            "min_overhead_pct": 100 * (min(l) / min(g) - 1),
            # on CUDA the host mostly waits in synchronize, so its CPU time says little
            "grpo_cpu_ms": 1e3 * statistics.median(gc), "laser_cpu_ms": 1e3 * statistics.median(lc),
            "cpu_overhead_pct": None if cuda else 100 * (statistics.median(lc) / statistics.median(gc) - 1),
            "grpo_ms_all": [round(1e3 * t, 2) for t in g], "laser_ms_all": [round(1e3 * t, 2) for t in l],
        }
        layouts[layout] = r
        print(f"{name:12s} {layout:6s} seq {lengths[layout]['grpo']}/{lengths[layout]['laser']}: "
              f"grpo {r['grpo_ms']:8.1f} ms, laser {r['laser_ms']:8.1f} ms, overhead {r['overhead_pct']:+.2f}% "
              f"(paired {r['paired_overhead_pct']:+.2f}%, CPU time {_pct(r['cpu_overhead_pct'])})", flush=True)
    n_tokens = sum(len(p) + len(r) - 1 for p, r, _ in rollout)
    sizes = {k: cfg.model.get(k) for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                           "ffn_hidden_size", "num_moe_experts", "moe_router_topk",
                                           "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                                           "vocab_size", "seq_length") if cfg.model.get(k) is not None}
    return {
        "model": name, "num_layers": int(cfg.model.num_layers), "hidden_size": int(cfg.model.hidden_size),
        "overrides": list(overrides), "sizes": sizes, "parameters": params, "param_dtype": param_dtype,
        "peak_gpu_memory_gib": peak_gib,
        "real_label_positions": {"grpo": n_tokens, "laser": n_tokens + batch_size,
                                 "extra_pct": 100 * batch_size / n_tokens},
        "layouts": layouts,
        "loss_only": {"grpo_ms": 1e3 * loss_grpo, "laser_ms": 1e3 * loss_laser,
                      "laser_extra_ms": 1e3 * (loss_laser - loss_grpo),
                      "extra_pct_of_padded_step": 100 * (loss_laser - loss_grpo) / layouts["padded"]["grpo_ms"] * 1e3},
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}%"


def _table(models: list[dict]) -> str:
    lines = ["| model | layout | seq_length GRPO / LaSeR | GRPO ms | LaSeR ms | overhead | paired | CPU-time overhead |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in models:
        for layout, r in m["layouts"].items():
            lines.append(f"| {m['model']} | {layout} | {r['seq_length']['grpo']} / {r['seq_length']['laser']} | "
                         f"{r['grpo_ms']:.1f} | {r['laser_ms']:.1f} | {r['overhead_pct']:+.2f}% | "
                         f"{r['paired_overhead_pct']:+.2f}% | {_pct(r['cpu_overhead_pct'])} |")
    lines.append("")
    lines.append("| model | rl_loss fwd+bwd GRPO ms | LaSeR ms | MSE term's extra, % of padded GRPO step |")
    lines.append("| --- | ---: | ---: | ---: |")
    for m in models:
        lo = m["loss_only"]
        lines.append(f"| {m['model']} | {lo['grpo_ms']:.2f} | {lo['laser_ms']:.2f} | "
                     f"{lo['extra_pct_of_padded_step']:+.2f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None,
                        help="presets to time (default: tiny_large tiny_turbos; on CUDA tiny_turbos only "
                             "with mamba_ssm installed)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(24, 40), metavar=("MIN", "MAX"))
    parser.add_argument("--response-tokens", type=int, nargs=2, default=(120, 180), metavar=("MIN", "MAX"))
    parser.add_argument("--packed-multiple", type=int, default=1,
                        help="round the packed layout's lengths up to a multiple of this")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--override", nargs="*", default=[],
                        help="Hydra overrides after model=<preset>, e.g. model.hidden_size=2048")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "laser_overhead.json"))
    args = parser.parse_args()
    cuda = args.device == "cuda"
    models_wanted = args.models
    if models_wanted is None:
        models_wanted = ["tiny_large", "tiny_turbos"]
        if cuda:
            import importlib.util

            if importlib.util.find_spec("mamba_ssm") is None:
                print("tiny_turbos skipped: mamba_ssm is not installed (pass --models to force it)", flush=True)
                models_wanted = ["tiny_large"]

    single_rank_env(29519)  # one rank, started here rather than by torchrun
    import torch

    from launch.config import load_config
    from megatron_ext import distributed
    from megatron_ext.quiet import quiet_known_warnings

    quiet_known_warnings()
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if not cuda and torch.cuda.is_available():
        # distributed.initialize picks NCCL and bf16 whenever a GPU is visible; a CPU run must hide it
        raise SystemExit("--device cpu on a machine with a GPU: set CUDA_VISIBLE_DEVICES= or pass --device cuda")
    cfg = load_config([])
    env = distributed.initialize(cfg.parallel, int(cfg.seed))
    assert env.cpu == (not cuda), (env.cpu, args.device)
    t0 = time.perf_counter()
    try:
        models = [model_overhead(m, args.batch, args.seq_length, args.warmup, args.repeats, args.device,
                                 args.override, tuple(args.prompt_tokens), tuple(args.response_tokens),
                                 args.packed_multiple)
                  for m in models_wanted]
    finally:
        distributed.destroy()
    host = {**machine(), "torch_threads": torch.get_num_threads(), "device": args.device,
            "torch": torch.__version__}
    if cuda:
        host.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                       gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    result = {
        "command": command("OMP_NUM_THREADS"),
        "git_commit": git_commit(),
        "machine": host,
        "settings": {"batch": args.batch, "seq_length": args.seq_length,
                     "prompt_tokens": "{}-{}".format(*args.prompt_tokens),
                     "response_tokens": "{}-{}".format(*args.response_tokens),
                     "packed_multiple": args.packed_multiple,
                     "warmup": args.warmup, "repeats": args.repeats,
                     "step": "forward + rl_loss + backward, optimizer excluded", "goal_overhead_pct": 2.0},
        "wall_s": time.perf_counter() - t0,
        "models": models,
    }
    write_result(args.out, result)
    print(_table(models))


if __name__ == "__main__":
    main()
