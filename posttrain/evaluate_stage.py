"""Evaluate stage: inference-time scaling with the LaSeR self-reward on any checkpoint (no training).

For each prompt, ``k`` answers are sampled and each is scored by the self-reward (one extra forward
position: the log-prob of ``z_c`` after the answer's end of turn, ``beta * (log p - c_ref)``). The
report, per evaluation set: pass@1, majority voting, self-reward-weighted majority voting,
self-reward best-of-K, pass@K, and the self-verification accuracy on correct and on incorrect answers
with their F1 (:mod:`posttrain.self_reward_eval`). Sets: the held-out synthetic tasks
(``eval/synthetic_tasks``) and the math sets of ``data_pipelines.eval_sets`` (``sets``; each capped to
``max_problems`` on CPUs), checked by ``data_pipelines.verifiers`` (math answers with math-verify).
Prompts too long for ``seq_length`` with ``max_new_tokens`` of answer are skipped and counted.

It evaluates its parent's checkpoint (``init_from`` or the previous stage) and hands that same
checkpoint on (``checkpoint`` in the stage folder is a link to it, a relative one when the checkpoint
is in the run folder, so that the link survives a move of the folder). ``c_ref``, ``beta`` and the
scoring temperature are the constants the self-reward was trained with (:func:`laser_constants`).
Writes ``evaluation.json`` and ``evaluation.txt`` in the stage folder and ``evaluation.txt`` in the run
folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron.core import parallel_state

from data_pipelines.eval_sets import answers_equivalent, load_eval_set
from data_pipelines.prepare import items_fingerprint, prepared_tokenizer
from megatron_ext import manifest, model_builder
from megatron_ext.errors import ConfigError
from megatron_ext.generation import Generator
from megatron_ext.models.recycle_routing import dropless_routing
from megatron_ext.stage import StageContext, StageResult
from megatron_ext.stage_training import load_frozen_model
from posttrain.chat_sampling import eval_tasks, prompt_ids, prompt_text, sampling_params
from posttrain.inference_scaling import format_table
from posttrain.rl_rollouts import RLSettings, RolloutBatches, rl_forward_step_factory
from posttrain.rl_stage import laser_file
from posttrain.self_reward_eval import forward_logps, self_reward_eval


def laser_constants(ctx: StageContext) -> dict[str, float]:
    """The self-reward's ``c_ref``, ``beta`` and scoring ``temperature``: each from the config where
    set, else from the :data:`~posttrain.rl_stage.LASER_FILE` of the RL stage ``laser.from_stage``
    names (default: the parent): the constants it trained the score with; the z_c log-prob is taken
    at that temperature, whatever this stage samples at. Naming another stage scores a checkpoint
    that never trained the score (SFT, plain GRPO) with the same constants: a baseline."""
    configured = {k: ctx.stage_cfg.laser.get(k) for k in ("c_ref", "beta", "temperature")}
    missing = [k for k, v in configured.items() if v is None]
    if not missing:
        return {k: float(v) for k, v in configured.items()}
    source = ctx.stage_cfg.laser.get("from_stage")
    checkpoint = (ctx.checkpoint_of(source, f"stages.{ctx.name}.laser.from_stage") if source
                  else Path(ctx.parent_checkpoint))
    path = laser_file(checkpoint)
    recorded = json.loads(path.read_text()) if path.exists() else {}
    unknown = [k for k in missing if k not in recorded]
    if unknown:
        where = f"{path} does not exist" if not path.exists() else f"{path} does not record {unknown}"
        raise ConfigError(f"stages.{ctx.name}.laser: {unknown} null and {where}: evaluate a checkpoint of an RL "
                          f"stage, name one in stages.{ctx.name}.laser.from_stage, or set "
                          + ", ".join(f"stages.{ctx.name}.laser.{k}" for k in unknown))
    return {k: float(recorded[k] if configured[k] is None else configured[k]) for k in configured}


def _link_checkpoint(stage_dir: Path, target: Path) -> Path:
    link = stage_dir / "checkpoint"
    if link.is_symlink() or link.exists():
        link.unlink()
    target = Path(target).resolve()
    if not os.path.isabs(manifest.relative_in(target, stage_dir.parent)):  # in the run folder
        target = os.path.relpath(target, stage_dir)
    os.symlink(target, link)
    return link


def run(ctx: StageContext) -> StageResult:
    cfg, st, model_cfg = ctx.cfg, ctx.stage_cfg, ctx.model_cfg
    if not ctx.parent_checkpoint:
        raise ConfigError(f"stages.{ctx.name}: nothing to evaluate; put a stage before it in pipeline.order "
                          f"or set stages.{ctx.name}.init_from to a checkpoint")
    seed = int(cfg.seed)
    tokenizer = prepared_tokenizer(cfg.data, ctx.run_dir / "data", cfg.seed)
    vocab = model_builder.model_vocab_size(model_cfg, tokenizer)
    chunks = load_frozen_model(ctx, tokenizer, ctx.parent_checkpoint)
    k, mbs = int(st.k), int(st.micro_batch_size)
    constants = laser_constants(ctx)
    # settings.temperature is the one the z_c log-prob is scored at; samples are drawn at `sampling`'s
    settings = RLSettings(groups=1, group_size=k, epochs=1, max_sampling_rounds=1, clip_eps=0.2, clip_eps_high=None,
                          kl_coef=0.0, temperature=constants["temperature"], thinking=st.get("thinking"),
                          laser=True, laser_alpha=0.0, laser_beta=constants["beta"], laser_coef=0.0,
                          laser_std_threshold=0.0, laser_loss_warmup=0, laser_adv_warmup=0, c_ref=constants["c_ref"])
    sampling = sampling_params(st.sampling, tokenizer)
    generator = Generator(chunks, vocab, max_batch_size=int(st.sampling.batch_size))
    seq_length = int(model_cfg.seq_length)
    batches = RolloutBatches(items=[], tokenizer=tokenizer, generator=generator, settings=settings,
                             sampling=sampling, seq_length=seq_length, micro_batch_size=mbs, global_batch_size=k,
                             dp_rank=parallel_state.get_data_parallel_rank(), dp_size=1, seed=seed)
    forward_step = rl_forward_step_factory(settings, batches)
    batches.logp_fn = lambda micro: forward_logps(chunks, micro, forward_step)

    sets = {"synthetic": (eval_tasks(st.eval, seed)[: int(st.max_problems)], None)}
    for name in st.sets:
        sets[name] = (load_eval_set(name, st.get("eval_dir"), limit=int(st.max_problems)), answers_equivalent)
    results = {}
    room = seq_length - int(st.sampling.max_new_tokens) - 1  # prompt + answer + z_c must fit a row
    with dropless_routing(chunks):
        for i, (name, (items, equivalent)) in enumerate(sets.items()):
            fits = [it for it in items if len(prompt_ids(tokenizer, prompt_text(it), settings.thinking)) <= room]
            if not fits:
                results[name] = {"n_prompts": 0, "skipped_too_long": len(items)}
                continue
            results[name] = {**self_reward_eval(batches, fits, seed + 1000 * i, equivalent=equivalent,
                                                ks=st.get("scaling_k") or ()),
                             "skipped_too_long": len(items) - len(fits)}
    table = format_table({name: r for name, r in results.items() if r["n_prompts"]})
    skipped = {name: r["skipped_too_long"] for name, r in results.items() if r["skipped_too_long"]}
    if skipped:
        table += f"\nskipped (prompt too long for seq_length {seq_length}): {skipped}"
    if ctx.env.is_main:
        evaluated = manifest.relative_in(ctx.parent_checkpoint, ctx.run_dir)   # the run folder may move
        (ctx.stage_dir / "evaluation.json").write_text(json.dumps(
            {"checkpoint": evaluated, "k": k, "sampling_temperature": sampling.temperature, "laser": constants,
             "results": results}, indent=1))
        for folder in (ctx.stage_dir, ctx.run_dir):
            (folder / "evaluation.txt").write_text(
                f"checkpoint {evaluated}, k={k}, sampled at temperature {sampling.temperature}, self-reward "
                f"scored at temperature {settings.temperature} (beta {settings.laser_beta}, c_ref "
                f"{settings.c_ref:.3f})\n{table}\n")
        print(table, flush=True)
        link = _link_checkpoint(ctx.stage_dir, Path(ctx.parent_checkpoint))
    else:
        link = ctx.stage_dir / "checkpoint"
    return StageResult(checkpoint=link, steps=0, tokens_seen=0,
                       final_metrics={"evaluation": results, "generation": generator.stats.as_dict()},
                       data_fingerprint=items_fingerprint({name: items for name, (items, _) in sets.items()}),
                       extra={"evaluated_checkpoint": str(ctx.parent_checkpoint)})
