"""Ask a megatron-core model chat questions: sampling requests, and the verifiable-task accuracy.

The glue between :mod:`megatron_ext.generation` (token prompts in, tokens out) and the post-training
stages, which think in user prompts, thinking modes and response text:

- :class:`ChatSampler` implements the ``Sampler`` protocol of :mod:`posttrain.cot_fusion`: each
  request's prompt is laid out by ``chat_format.format_prompt`` (the same layout SFT trains on, so
  generation continues where training did), an assistant ``prefix`` is appended as text, and the
  response stops at ``[END_OF_TURN]`` (or EOD), which is stripped from the text.
- :func:`task_accuracy`: greedy answers to held-out synthetic tasks, verified exactly: the number
  every post-training stage reports before and after it trains. A stage's "before" is its parent's
  "after" (:func:`parent_task_accuracy`): measured once, by the parent, and read from its manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from data_pipelines import special_tokens
from data_pipelines.chat_format import AUTO, format_prompt, split_mode
from data_pipelines.verifiable_tasks import Task, generate_tasks, split_tasks, verify
from megatron_ext.generation import Generation, Generator, SamplingParams
from posttrain.cot_fusion import SampleRequest


def stop_ids(tokenizer) -> tuple[int, ...]:
    return (tokenizer.special_id(special_tokens.END_OF_TURN), tokenizer.eod)


def chat_params(tokenizer, *, temperature: float, max_new_tokens: int, top_p: float = 1.0,
                top_k: int = 0) -> SamplingParams:
    """Sampling a chat response: it stops at the end of turn (or EOD) and never emits LaSeR's
    self-reward token ``z_c`` (which training only ever puts after a finished response)."""
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                          stop_token_ids=stop_ids(tokenizer),
                          banned_token_ids=(tokenizer.special_id(special_tokens.SELF_REWARD),))


def sampling_params(cfg: Mapping[str, Any], tokenizer) -> SamplingParams:
    """A stage's ``sampling`` block (temperature, top_p, top_k, max_new_tokens) for chat responses."""
    return chat_params(tokenizer, temperature=float(cfg.get("temperature", 1.0)), top_p=float(cfg.get("top_p", 1.0)),
                       top_k=int(cfg.get("top_k", 0)), max_new_tokens=int(cfg["max_new_tokens"]))


def response_text(tokenizer, generation: Generation, start: int = 0) -> str:
    """The response's text from its token ``start`` on (1: after a mode token the model chose),
    without the stop token of a finished one."""
    tokens = generation.tokens[:-1] if generation.finished else generation.tokens
    return tokenizer.detokenize(tokens[start:])


def prompt_text(item) -> str:
    """What the user asks: ``.prompt`` of tasks and prompts, ``.problem`` of evaluation-set items."""
    return item.prompt if hasattr(item, "prompt") else item.problem


def prompt_ids(tokenizer, prompt: str, thinking: str | None, prefix: str = "") -> list[int]:
    ids = format_prompt([{"role": "user", "content": prompt}], tokenizer, thinking=thinking)
    return ids + (tokenizer.tokenize(prefix) if prefix else [])


class ChatSampler:
    """``requests -> n response texts each`` from a :class:`Generator` (all requests in one call).

    Call ``k`` samples with seed ``seed + k``, so a stage that makes the same calls in the same order
    (a rerun) samples the same responses. :attr:`generations` keeps the last call's raw outputs.
    """

    def __init__(self, generator: Generator, tokenizer, params: SamplingParams, seed: int):
        self.generator, self.tokenizer, self.params = generator, tokenizer, params
        self.seed, self.calls = int(seed), 0
        self.generations: list[list[Generation]] = []

    def __call__(self, requests: Sequence[SampleRequest]) -> list[list[str]]:
        prompts = [prompt_ids(self.tokenizer, r.prompt, r.thinking, r.prefix) for r in requests for _ in range(r.n)]
        flat = self.generator.generate_sharded(prompts, self.params, seed=self.seed + self.calls)
        self.calls += 1
        out, start = [], 0
        for r in requests:
            out.append(flat[start:start + r.n])
            start += r.n
        self.generations = out
        return [[response_text(self.tokenizer, g) for g in group] for group in out]


def eval_tasks(eval_cfg: Mapping[str, Any], seed: int) -> list[Task]:
    """The held-out tasks of the ``eval/`` preset: the SFT stage's split of the same generated set."""
    tasks = generate_tasks(list(eval_cfg["kinds"]), int(eval_cfg["num_tasks"]), int(seed),
                           difficulties=list(eval_cfg["difficulties"]))
    _, held_out = split_tasks(tasks, float(eval_cfg["held_out_fraction"]), int(seed))
    return held_out[: int(eval_cfg["max_eval_tasks"])]


def task_accuracy(generator: Generator, tokenizer, tasks: Sequence[Task], thinking: str | None,
                  max_new_tokens: int) -> dict[str, Any]:
    """Greedy accuracy on ``tasks``: overall, per kind and per difficulty, with response lengths.
    ``thinking="auto"``: the model picks its mode (its first token); the share of each mode per
    difficulty is reported too (Hunyuan-TurboS' adaptive CoT: short for easy, long for hard)."""
    params = chat_params(tokenizer, temperature=0.0, max_new_tokens=max_new_tokens)
    gens = generator.generate_sharded([prompt_ids(tokenizer, t.prompt, thinking) for t in tasks], params)
    by_kind: dict[str, list[float]] = defaultdict(list)
    by_level: dict[int, list[float]] = defaultdict(list)
    tokens_by_level: dict[int, list[int]] = defaultdict(list)
    modes_by_level: dict[int, list[str]] = defaultdict(list)
    for task, gen in zip(tasks, gens):
        mode, rest = split_mode(gen.tokens, tokenizer) if thinking == AUTO else (thinking, gen.tokens)
        reward, _ = verify(task, response_text(tokenizer, gen, start=len(gen.tokens) - len(rest)))
        by_kind[task.kind].append(reward)
        by_level[task.difficulty].append(reward)
        tokens_by_level[task.difficulty].append(len(gen.tokens))
        modes_by_level[task.difficulty].append(mode or "none")
    rewards = [r for rs in by_kind.values() for r in rs]
    result = {
        "accuracy": sum(rewards) / max(len(rewards), 1),
        "n": len(rewards),
        "by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())},
        "by_difficulty": {str(d): round(sum(v) / len(v), 4) for d, v in sorted(by_level.items())},
        "response_tokens_by_difficulty": {str(d): round(sum(v) / len(v), 2) for d, v in sorted(tokens_by_level.items())},
        "finished": sum(g.finished for g in gens) / max(len(gens), 1),
        "mean_response_tokens": sum(len(g.tokens) for g in gens) / max(len(gens), 1),
        "thinking": thinking,
    }
    if thinking == AUTO:   # which mode the model chose, per difficulty ("none": no mode token first)
        result["mode_share_by_difficulty"] = {
            str(d): {m: round(v.count(m) / len(v), 4) for m in ("short", "long", "none")}
            for d, v in sorted(modes_by_level.items())}
    return result


def _plain(value: Any) -> Any:
    """Nested config values (OmegaConf containers included) as plain dicts and lists."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def accuracy_key(model_cfg: Mapping[str, Any], eval_cfg: Mapping[str, Any], seed: int) -> str:
    """What a task accuracy depends on besides the weights: the stage's model config (RoPE base,
    sequence length, ...), the eval preset (tasks, thinking mode, token budget, batch) and the seed."""
    text = json.dumps({"model": _plain(model_cfg), "eval": _plain(eval_cfg), "seed": int(seed)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_task_accuracy(chunks, tokenizer, vocab_size: int, eval_cfg: Mapping[str, Any], seed: int,
                        model_cfg: Mapping[str, Any]) -> dict:
    """:func:`task_accuracy` of a stage's model (built from ``model_cfg``) on its ``eval`` preset;
    ``measured_with`` is its :func:`accuracy_key`."""
    generator = Generator(chunks, vocab_size, max_batch_size=int(eval_cfg.get("batch_size", 32)))
    result = task_accuracy(generator, tokenizer, eval_tasks(eval_cfg, seed), eval_cfg.get("thinking"),
                           int(eval_cfg["max_new_tokens"]))
    return {**result, "measured_with": accuracy_key(model_cfg, eval_cfg, seed)}


def parent_task_accuracy(ctx, eval_cfg: Mapping[str, Any]) -> dict | None:
    """The parent stage's final task accuracy, if it measured exactly what this stage would measure
    before its first step, else None.

    That is the case when the parent is a stage of this run folder that completed on the checkpoint
    this stage starts from, and measured it with the same :func:`accuracy_key` (model config, eval
    preset, seed): greedy answers from the same weights are the same answers, so a stage's "before"
    is its parent's "after" instead of a second pass over the held-out tasks. A parent that measured
    another thinking mode, another model config or no accuracy at all (pretraining) gives None."""
    from megatron_ext import manifest

    if not ctx.parent_checkpoint:
        return None
    checkpoint = Path(ctx.parent_checkpoint).resolve()
    stage_dir = Path(ctx.parent_checkpoint).parents[1]     # <run_dir>/<NN_stage>/checkpoints/iter_*
    if stage_dir.parent.resolve() != Path(ctx.run_dir).resolve():
        return None
    done = manifest.read(stage_dir)
    if not done or done.get("status") != manifest.COMPLETE or not done.get("checkpoint"):
        return None
    if (stage_dir / done["checkpoint"]).resolve() != checkpoint:
        return None
    key = accuracy_key(ctx.model_cfg, eval_cfg, int(ctx.cfg.seed))
    recorded = (done.get("final_metrics") or {}).get("task_accuracy")
    candidates = [recorded] + (list(recorded.values()) if isinstance(recorded, dict) else [])
    for candidate in candidates:
        if isinstance(candidate, dict) and candidate.get("measured_with") == key:
            return {**candidate, "from_parent": stage_dir.name}
    return None


def initial_task_accuracy(ctx, chunks, tokenizer, vocab_size: int, eval_cfg: Mapping[str, Any]) -> dict:
    """A stage's accuracy before it trains: its parent's recorded one (:func:`parent_task_accuracy`),
    else measured on ``chunks`` (the parent's weights)."""
    return parent_task_accuracy(ctx, eval_cfg) or stage_task_accuracy(
        chunks, tokenizer, vocab_size, eval_cfg, int(ctx.cfg.seed), ctx.model_cfg)
