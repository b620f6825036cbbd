"""RL stage: GRPO with the LaSeR self-reward on megatron-core (Hunyuan-TurboS two-stage RL).

The same module runs both RL stages; their presets differ in data and KL:

- ``rl_stem`` (stage I, reasoning): math : code : logic prompts with verifiable answers, small KL;
- ``rl_general`` (stage II): instruction-following prompts with checkable constraints plus a replay
  share of reasoning prompts, larger KL.

Each update is one :class:`megatron_ext.trainer.Trainer` step on the batches of
:class:`posttrain.rl_rollouts.RolloutBatches` (sampling, verification, filtering, log-probs) with the
loss of :func:`posttrain.rl_rollouts.rl_loss`. With ``kl_coef > 0`` a frozen reference model (the
parent's weights) is built and kept; with 0 it is never loaded. LaSeR's ``c_ref`` is configured, or
inherited from a parent RL stage, or estimated once from the first rollout (the initial policy is the
reference then); it is saved with the stage, so a resumed attempt uses the same constant.

Reported: per-rollout metrics (split ``rollout`` of ``metrics/metrics.jsonl``: reward, filtering,
self-verification of the rollout), sample responses with the verifier's reasons (``rollouts.jsonl``),
per-update metrics (loss, KL, clip fraction), and in the manifest the reward per pass over the
prompt pool, task accuracy before and after, and the self-reward's verification on held-out tasks
(:func:`posttrain.self_reward_eval.self_reward_eval`).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from megatron.core import parallel_state

from data_pipelines.code_tasks import generate_code_tasks, load_code_tasks
from data_pipelines.eval_sets import load_eval_set
from data_pipelines.instruction_prompts import generate_instruction_prompts
from data_pipelines.prepare import items_fingerprint, prepared_tokenizer
from data_pipelines.verifiable_tasks import generate_tasks, split_tasks
from megatron_ext import manifest
from megatron_ext.batch_sizes import micro_batch_size
from megatron_ext.errors import ConfigError
from megatron_ext.generation import Generator
from megatron_ext.metrics import read_metrics
from megatron_ext.models.recycle_routing import dropless_routing
from megatron_ext.stage import StageContext, StageResult
from megatron_ext.stage_training import build_stage_model, load_frozen_model, train_stage
from posttrain import laser
from posttrain.chat_sampling import eval_tasks, initial_task_accuracy, sampling_params, stage_task_accuracy
from posttrain.rl_rollouts import RLSettings, RolloutBatches, rl_forward_step_factory
from posttrain.self_reward_eval import forward_logps, self_reward_eval


def rl_settings(st) -> RLSettings:
    rl, ls = st.rl, st.laser
    return RLSettings(
        groups=int(rl.groups), group_size=int(rl.group_size), epochs=int(rl.epochs),
        max_sampling_rounds=int(rl.max_sampling_rounds), clip_eps=float(rl.clip_eps),
        clip_eps_high=None if rl.get("clip_eps_high") is None else float(rl.clip_eps_high),
        kl_coef=float(rl.kl_coef), temperature=float(st.sampling.temperature), thinking=st.get("thinking"),
        laser=bool(ls.enabled), laser_alpha=float(ls.alpha), laser_beta=float(ls.beta),
        laser_coef=float(ls.adv_coef), laser_std_threshold=float(ls.std_threshold),
        laser_loss_warmup=int(ls.loss_warmup_steps), laser_adv_warmup=int(ls.adv_warmup_steps),
        c_ref=None if ls.get("c_ref") is None else float(ls.c_ref),
        mode_reward=dict(st.rewards.mode) if (st.get("rewards") or {}).get("mode") else None,
        compression_weight=float((st.get("rewards") or {}).get("compression_weight") or 0.0),
    )


SOURCES = ("synthetic", "code", "instruction", "math_file", "code_file")


def prompt_items(prompts_cfg, eval_cfg, seed: int) -> list[Any]:
    """The stage's prompt mixture, each source ``weight`` share of ``num_prompts`` (interleaved at
    random, deterministic per seed). Generated: ``synthetic`` verifiable tasks (math / logic; never an
    eval task), ``code`` tasks with hidden tests, ``instruction`` prompts with checkable constraints.
    Local files (``path``; the first ``n`` lines): ``math_file``, JSON lines with ``problem`` and
    ``answer`` (checked by math-verify), ``code_file``, JSON lines with ``prompt``, ``tests`` and
    ``entry_point`` (run in the sandbox)."""
    total = int(prompts_cfg.num_prompts)
    sources = {k: v for k, v in prompts_cfg.sources.items() if float(v.weight) > 0}
    weight_sum = sum(float(v.weight) for v in sources.values())
    items: list[Any] = []
    for name, src in sorted(sources.items()):
        n = max(1, round(total * float(src.weight) / weight_sum))
        offset = seed + int(src.get("seed_offset", 0))
        if name == "synthetic":
            tasks = generate_tasks(list(src.kinds), 2 * n, offset, difficulties=list(src.difficulties))
            train_side, _ = split_tasks(tasks, float(eval_cfg.held_out_fraction), seed)
            eval_ids = {t.id for t in eval_tasks(eval_cfg, seed)}
            items += [t for t in train_side if t.id not in eval_ids][:n]
        elif name == "code":
            items += generate_code_tasks(n, offset, difficulties=list(src.difficulties))
        elif name == "instruction":
            items += generate_instruction_prompts(n, offset, max_constraints=int(src.max_constraints))
        elif name == "math_file":
            path = Path(src.path)
            items += load_eval_set(path.stem, path.parent, limit=n)
        elif name == "code_file":
            items += load_code_tasks(src.path, limit=n)
        else:
            raise ConfigError(f"prompts.sources.{name}: unknown source; choose one of {list(SOURCES)}")
    random.Random(f"rl-mix:{seed}").shuffle(items)
    return items


def _reward_by_pass(rollouts: list[dict]) -> dict[str, float]:
    """Mean reward of each rollout's first draw, per pass over the prompt pool. Rollouts of different
    passes draw the same prompts in the same order, so passes compare like with like (a rollout's
    own reward mostly tracks how hard its prompts are)."""
    by_pass: dict[int, list[float]] = {}
    for r in rollouts:
        by_pass.setdefault(int(r["pool_pass"]), []).append(r["first_draw_reward"])
    full = max(len(v) for v in by_pass.values()) if by_pass else 0
    return {str(p): round(sum(v) / len(v), 4) for p, v in sorted(by_pass.items()) if len(v) == full}


def _log_samples(path: Path, rollout: int, batches: RolloutBatches, n: int) -> None:
    """The first ``n`` samples of a rollout with their reward and the verifier's reason (why a
    response scored 0 is otherwise invisible), appended as JSON lines."""
    with open(path, "a") as f:
        for s in batches.last_samples[:n]:
            f.write(json.dumps({"rollout": rollout, "item": s.item.id, "mode": s.mode, "finished": s.finished,
                                "reward": s.reward, "verifier": s.correct, "reason": s.reason,
                                "advantage": round(s.advantage, 4),
                                "self_reward": None if math.isnan(s.score) else s.score,
                                "response": batches.tokenizer.detokenize(s.tokens)}) + "\n")


def _loss_summary(sink: dict) -> dict[str, float]:
    out = {k: sum(v) / len(v) for k, v in sink.items() if isinstance(v, list) and v}
    if "laser_mse_sum" in sink:
        out["laser_mse_sum"] = sink["laser_mse_sum"]
    return out


LASER_FILE = "laser_c_ref.json"   # in an RL stage's folder: the constants its self-reward was trained with


def laser_file(checkpoint: str | Path) -> Path:
    """The :data:`LASER_FILE` of the stage a checkpoint (``<stage>/checkpoints/iter_*``) belongs to."""
    return Path(checkpoint).parents[1] / LASER_FILE


def laser_record(c_ref: float, settings: RLSettings, **extra) -> dict:
    """What :data:`LASER_FILE` records: the score's constants. ``r_s = beta * (log pi_T(z_c) - c_ref)``
    depends on all three: ``log pi_T`` is taken at the sampling temperature ``T`` (logits / T, as
    LaSeR's reference code takes every log-prob), so whoever scores with this self-reward (stage II,
    the evaluate stage) must use the same beta and temperature, whatever it samples at."""
    return {"c_ref": c_ref, "beta": settings.laser_beta, "temperature": settings.temperature, **extra}


def _warn(ctx: StageContext, message: str) -> None:
    if ctx.env.is_main:
        print(f"warning: stages.{ctx.name}: {message}", flush=True)


def _warn_if_c_ref_unusable(ctx: StageContext, c_ref: float, settings: RLSettings) -> None:
    problem = laser.c_ref_problem(c_ref, settings.laser_beta)
    if problem:
        _warn(ctx, problem)


def _known_c_ref(ctx: StageContext, settings: RLSettings, own_file: Path) -> float | None:
    """LaSeR's c_ref if already known: configured, else this stage's earlier attempt's, else the
    parent RL stage's (stage II continues stage I's self-reward: c_ref stands for the *reference*
    model's log-prob, so it stays the constant stage I trained the score against; re-estimating it
    from the RL'd policy would shift every score). None: estimate it from the first rollout."""
    if settings.c_ref is not None:
        return settings.c_ref
    if own_file.exists():
        return float(json.loads(own_file.read_text())["c_ref"])
    parent_file = laser_file(ctx.parent_checkpoint)
    if parent_file.exists():
        parent = json.loads(parent_file.read_text())
        value = float(parent["c_ref"])
        for key, ours in (("beta", settings.laser_beta), ("temperature", settings.temperature)):
            if key in parent and float(parent[key]) != ours:
                _warn(ctx, f"the self-reward inherited from {parent_file.parent.name} was trained with laser "
                           f"{key}={parent[key]}, this stage uses {ours}: its scores change meaning")
        if ctx.env.is_main:
            inherited_from = manifest.relative_in(parent_file, ctx.run_dir)   # the run folder may move
            own_file.write_text(json.dumps(laser_record(value, settings, inherited_from=inherited_from)))
        return value
    return None


def run(ctx: StageContext) -> StageResult:
    cfg, st, model_cfg = ctx.cfg, ctx.stage_cfg, ctx.model_cfg
    if not ctx.parent_checkpoint:
        raise ConfigError(f"stages.{ctx.name}: RL starts from a trained policy; put a stage before it in "
                          f"pipeline.order or set stages.{ctx.name}.init_from")
    seed = int(cfg.seed)
    tokenizer = prepared_tokenizer(cfg.data, ctx.run_dir / "data", cfg.seed)
    settings = rl_settings(st)
    c_ref_file = ctx.stage_dir / LASER_FILE
    settings.c_ref = _known_c_ref(ctx, settings, c_ref_file)
    if settings.laser and settings.c_ref is not None:
        _warn_if_c_ref_unusable(ctx, settings.c_ref, settings)
    model = build_stage_model(ctx, tokenizer)
    seq_length = int(model_cfg.seq_length)
    train = st.train
    mbs, gbs = micro_batch_size(train, ctx.env.dp, ctx.env.pp), int(train.global_batch_size)
    sampling = sampling_params(st.sampling, tokenizer)
    generator = Generator(model.chunks, model.vocab_size, max_batch_size=int(st.sampling.batch_size))
    holder: dict[str, Any] = {}

    def on_rollout(rollout: int, stats: dict) -> None:
        trainer = holder["trainer"]
        if ctx.env.is_main:
            if settings.laser and batches.c_ref is not None and not c_ref_file.exists():
                how = {"estimated_at_rollout": rollout} if settings.c_ref is None else {"configured": True}
                c_ref_file.write_text(json.dumps(laser_record(batches.c_ref, settings, **how)))
                if settings.c_ref is None:   # estimated just now (a known one was checked at the start)
                    _warn_if_c_ref_unusable(ctx, batches.c_ref, settings)
            trainer.metrics.write(rollout * batches.updates_per_rollout, stats, split="rollout")
            _log_samples(ctx.stage_dir / "rollouts.jsonl", rollout, batches, int(st.get("log_samples", 8)))

    pool = prompt_items(st.prompts, st.eval, seed)
    batches = RolloutBatches(
        items=pool, tokenizer=tokenizer, generator=generator,
        settings=settings, sampling=sampling, seq_length=seq_length, micro_batch_size=mbs,
        global_batch_size=gbs, dp_rank=parallel_state.get_data_parallel_rank(), dp_size=ctx.env.dp,
        seed=seed + int(st.rl.get("seed_offset", 0)), on_rollout=on_rollout)
    forward_step = rl_forward_step_factory(settings, batches)
    # the frozen reference policy: the parent's weights
    ref_chunks = load_frozen_model(ctx, tokenizer, ctx.parent_checkpoint) if settings.kl_coef > 0 else None

    def on_trainer(trainer) -> None:
        holder["trainer"] = trainer
        batches.logp_fn = lambda micro: forward_logps(trainer.chunks, micro, forward_step)
        if ref_chunks is not None:
            batches.ref_logp_fn = lambda micro: forward_logps(ref_chunks, micro, forward_step)
        trainer.step_metrics_fn = lambda: _loss_summary(batches.loss_metrics)

    def accuracy(chunks) -> dict:
        return stage_task_accuracy(chunks, tokenizer, model.vocab_size, st.eval, seed, model_cfg)

    def initial_accuracy(chunks) -> dict:
        return initial_task_accuracy(ctx, chunks, tokenizer, model.vocab_size, st.eval)

    # On-policy needs the trained policy to be the sampled one: routing is dropless in the updates too,
    # as it is in generation (capacity would drop or re-route tokens differently per micro-batch).
    with dropless_routing(model.chunks + (ref_chunks or [])):
        outcome = train_stage(ctx, tokenizer, None, None, forward_step=forward_step, model=model,
                              initial_metrics=lambda chunks: {"initial_task_accuracy": initial_accuracy(chunks)},
                              train_batches=batches, on_trainer=on_trainer)
    trainer = outcome.trainer
    rollouts = read_metrics(ctx.stage_dir / "metrics" / "metrics.jsonl", split="rollout")
    final = {
        **outcome.final_metrics,
        "task_accuracy": accuracy(trainer.chunks),
        "reward_by_pool_pass": _reward_by_pass(rollouts),
        "rollouts": len(rollouts),
        "c_ref": batches.c_ref,
    }
    held_out = eval_tasks(st.eval, seed)
    if settings.laser:
        final["self_reward_eval"] = self_reward_eval(batches, held_out[: int(st.self_reward_eval.num_tasks)], seed + 7)
    return StageResult(
        checkpoint=outcome.checkpoint,
        steps=trainer.state.step,
        tokens_seen=trainer.state.tokens_seen,
        final_metrics=final,
        data_fingerprint=items_fingerprint({"prompts": pool, "eval": held_out}),
        extra={"rl": {"updates_per_rollout": batches.updates_per_rollout, "prompts": len(batches.items),
                      "kl_coef": settings.kl_coef, "laser": settings.laser},
               "expert_lr_scale": outcome.expert_lr_scale},
    )
