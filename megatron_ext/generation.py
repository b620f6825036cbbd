"""Batched sampling from megatron-core models with a KV cache: the rollouts of every post-training stage.

Why our own loop: megatron-core 0.16.1's inference engines assume CUDA (``is_cuda`` asserts in their
pipeline communication, CUDA generators, CUDA graphs), and the CPU demo and CI must generate with the
same code the GPUs run. What is megatron-core's and reused as is: ``StaticInferenceContext`` (the
per-layer KV cache, and the Mamba conv / SSM states, both keyed by layer number), the models' own
inference paths (attention's cache, our CLA layers' one-cache-per-group, Mamba's one-token decode) and
``runtime_gather_output`` for tensor-parallel logits.

Batching as megatron's static engine does it: prompts of different lengths share one context; the
shortest prompt length is encoded at once (prefill), then one position per step, and a row still inside
its prompt is fed its next prompt token instead of a sample. No padding ever enters a row's state,
which matters for Mamba (a left pad would flow into its recurrent state). Prompts are batched in order
of length (results come back in request order), so the rows of a batch reach their first sampled token
within a few steps of each other instead of the shortest one waiting out the longest one's prompt.

Layouts: TP ranks compute the same gathered logits; the tokens are sampled on tensor rank 0 of the last
pipeline stage and broadcast, so every rank feeds the same tokens. Pipeline stages (and virtual chunks)
run in ring order, passing hidden states [s, b, h] point to point. Sequence parallelism is switched
off while generating (:func:`sequence_parallel_disabled`). With expert parallelism every rank
of the data-parallel group must run the same forwards (the MoE dispatch is collective), so the batch
count, batch size, prefill length and step count are agreed over that group first.

Decode steps: once the prefill is done, each step feeds one token per row. Where
:func:`megatron_ext.decode_graph.static_reason` allows (one chunk, no TP / PP; both model families)
those steps run on fixed buffers at a device-side position (:class:`~megatron_ext.decode_graph.DecodeStep`),
and on GPUs (sync-free MoE dispatch, no EP) the step is captured as a CUDA graph once per batch and
replayed: a decode step otherwise spends most of its time launching kernels from Python.

MoE routing is dropless while generating (:func:`megatron_ext.models.recycle_routing.dropless_routing`):
capacity is a training-throughput device, and with it a token's output would depend on which other
prompts share its batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_ext import decode_graph
from megatron_ext.errors import ConfigError
from megatron_ext.mcore_compat import inference_mode
from megatron_ext.models.recycle_routing import dropless_routing


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation of the distribution.
    ``banned_token_ids`` are never generated (e.g. LaSeR's self-reward token, which only ever
    follows a finished response in training rows)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    banned_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} (must be >= 0; 0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p} (must be in (0, 1])")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} (must be >= 0; 0 keeps every token)")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} (must be >= 1)")
        if problems:
            raise ConfigError("sampling: " + "; ".join(problems))


@dataclass
class Generation:
    """One request's continuation. ``finished``: it ended with a stop token (kept as its last token);
    otherwise it was cut at ``max_new_tokens`` (LaSeR and GRPO treat the two differently).
    ``logprobs``: each sampled token's log-probability under the sampling temperature, before top-k /
    top-p truncation (greedy: at temperature 1)."""

    tokens: list[int]
    logprobs: list[float]
    finished: bool


@dataclass
class GenerationStats:
    requests: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    forward_steps: int = 0
    seconds: float = 0.0
    per_batch: list = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "generated_tokens": self.generated_tokens,
                "prompt_tokens": self.prompt_tokens, "forward_steps": self.forward_steps,
                "seconds": round(self.seconds, 3), "tokens_per_s": round(self.tokens_per_s, 2)}


def truncate_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [b, V] with everything outside the top-k and outside the top-p nucleus set to -inf.

    The nucleus is the smallest set of most probable tokens whose probability reaches ``top_p`` (the
    most probable token is always kept)."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more probable tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [b], its log-prob [b]) from logits [b, V] (float32). Banned tokens get probability 0
    before anything else, so log-probs are those of the distribution actually sampled."""
    logits = logits.float()
    if params.banned_token_ids:
        logits = logits.index_fill(-1, torch.tensor(params.banned_token_ids, device=logits.device), float("-inf"))
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / params.temperature
        logp = torch.log_softmax(scaled, dim=-1)
        probs = torch.softmax(truncate_logits(scaled, params.top_k, params.top_p), dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# One forward of the whole model over the pipeline
# ----------------------------------------------------------------------------------------------


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _pipeline_forward(chunks, tokens: torch.Tensor, position_ids: torch.Tensor,
                      ctx: StaticInferenceContext, hidden_size: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Logits [b, s', V] on the last pipeline stage (s' = 1: the context keeps only the last token's
    logits), None elsewhere. Chunks run in ring order: (rank 0, chunk 0), (rank 1, chunk 0), ...,
    (rank P-1, chunk 0), (rank 0, chunk 1), ...; each non-first chunk receives from the ring's previous
    rank and each non-last chunk sends to the next."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1 and len(chunks) == 1:
        with inference_mode():
            return chunks[0](tokens, position_ids, None, inference_context=ctx, runtime_gather_output=True)
    batch, seq = tokens.shape
    logits = None
    for chunk in chunks:
        if not chunk.pre_process:
            hidden = torch.empty(seq, batch, hidden_size, dtype=dtype, device=tokens.device)
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            chunk.set_input_tensor(hidden)
        with inference_mode():
            out = chunk(tokens, position_ids, None, inference_context=ctx, runtime_gather_output=True)
        if chunk.post_process:
            logits = out
        else:
            dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
    return logits


def _broadcast_from_sampler(t: torch.Tensor) -> torch.Tensor:
    """Make ``t`` (valid on tensor rank 0 of the last pipeline stage) equal on every model-parallel
    rank: first over the last stage's tensor group, then down each pipeline."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            dist.broadcast(t, src=parallel_state.get_tensor_model_parallel_src_rank(),
                           group=parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return t


_SP_FLAGS = ("sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def sequence_parallel_disabled(chunks):
    """Run a model built with sequence parallelism without it inside the block; restored on exit.

    Static-batching inference cannot shard the sequence (a decode step has one position, and
    megatron-core's Mamba inference asserts it off), and MoE with TP trains only with it on. The flag
    is read at forward time from each module's config and from attributes the parallel layers and the
    embedding copy at construction, so both are switched. Without it, TP ranks hold whole sequences;
    megatron-core's allgather MoE dispatcher and the TP layers give the same numbers that way.
    """
    saved = []
    for chunk in chunks:
        for module in chunk.modules():
            for name in _SP_FLAGS:
                if getattr(module, name, None) is True:
                    saved.append((module, name))
                    setattr(module, name, False)
            config = getattr(module, "config", None)
            if getattr(config, "sequence_parallel", None) is True:
                saved.append((config, "sequence_parallel"))
                config.sequence_parallel = False
    try:
        yield
    finally:
        for obj, name in saved:
            setattr(obj, name, True)


def _agree(value: int, op, group) -> int:
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=op, group=group)
    return int(t.item())


def _lockstep_group():
    """The ranks that must run identical forwards: data-parallel peers when experts are sharded."""
    if not dist.is_initialized() or parallel_state.get_expert_model_parallel_world_size() == 1:
        return None
    if parallel_state.get_data_parallel_world_size() == 1:
        return None
    return parallel_state.get_data_parallel_group()


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


class Generator:
    """Samples continuations of token prompts from a megatron-core model (list of pipeline chunks).

    ``vocab_size``: the tokenizer's size; logits of the padded vocabulary beyond it are never sampled.
    ``max_batch_size``: sequences per static context (memory: KV cache and Mamba states scale with it).
    ``use_cache=False`` re-runs the whole prefix every step: the reference the cache must reproduce.
    ``static_decode``: one-token steps on fixed buffers, CUDA-graph captured on GPUs
    (:mod:`megatron_ext.decode_graph`); None = wherever the model and device allow a graph, True = on
    any device (eager on CPU; a ConfigError where the model does not allow it), False = never.
    """

    def __init__(self, chunks, vocab_size: int, max_batch_size: int = 16, use_cache: bool = True,
                 static_decode: bool | None = None):
        self.chunks = [_unwrap(c) for c in (chunks if isinstance(chunks, (list, tuple)) else [chunks])]
        config = self.chunks[0].config
        if config.context_parallel_size > 1:
            raise ConfigError(
                f"generation under context_parallel_size={config.context_parallel_size}: decoding keeps a "
                f"whole KV cache and Mamba state per sequence on one rank; build the model with "
                f"context_parallel_size=1 (post-training stages do: megatron_ext.stage.stage_parallel_config)")
        self.hidden_size = config.hidden_size
        self.dtype = config.params_dtype if not (config.bf16 or config.fp16) else (
            torch.bfloat16 if config.bf16 else torch.float16)
        self.vocab_size = vocab_size
        self.max_batch_size = max_batch_size
        self.use_cache = use_cache
        self.device = next(self.chunks[0].parameters()).device
        self.stats = GenerationStats()
        self.static_decode, self.decode_graphs = False, False
        if use_cache and static_decode is not False:
            reason = decode_graph.static_reason(self.chunks)
            if static_decode and reason is not None:
                raise ConfigError(f"generation: static_decode=True, but the model cannot run it: {reason}")
            self.decode_graphs = decode_graph.graph_reason(self.chunks) is None
            self.static_decode = reason is None and (bool(static_decode) or self.decode_graphs)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seed: int = 0) -> list[Generation]:
        """One :class:`Generation` per prompt, in order. Sampling draws from one generator seeded with
        ``seed``, so a call is reproducible for the same prompts, batch size and layout. Batches are
        made of prompts of similar length (module docstring)."""
        if any(len(p) == 0 for p in prompts):
            raise ConfigError("generation: every prompt needs at least one token (e.g. a BOS or role token)")
        group = _lockstep_group()
        n_batches = _agree(math.ceil(len(prompts) / self.max_batch_size), dist.ReduceOp.MAX, group)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))   # stable: ties keep their order
        rng = torch.Generator(device=self.device)
        rng.manual_seed(int(seed))
        was_training = [c.training for c in self.chunks]
        for c in self.chunks:
            c.eval()
        t0 = time.perf_counter()
        results: list[Generation] = []
        try:
            with dropless_routing(self.chunks), sequence_parallel_disabled(self.chunks):
                for i in range(n_batches):
                    rows = order[i * self.max_batch_size:(i + 1) * self.max_batch_size]
                    results.extend(self._generate_batch([list(prompts[r]) for r in rows], params, rng, group))
        finally:
            for c, mode in zip(self.chunks, was_training):
                c.train(mode)
        in_order: list[Generation] = [None] * len(prompts)  # type: ignore[list-item]
        for r, generation in zip(order, results):
            in_order[r] = generation
        results = in_order
        self.stats.seconds += time.perf_counter() - t0
        self.stats.requests += len(prompts)
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.generated_tokens += sum(len(g.tokens) for g in results)
        return results

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams,
                        rng: torch.Generator, group) -> list[Generation]:
        real = len(prompts)
        # Rows beyond the real prompts (lock-step peers with fewer prompts) copy a prompt and are dropped.
        width = _agree(real, dist.ReduceOp.MAX, group) if group is not None else real
        rows = prompts + [prompts[0] if prompts else [0]] * (width - real)
        lengths = torch.tensor([len(p) for p in rows])
        max_len = _agree(int(lengths.max()) + params.max_new_tokens, dist.ReduceOp.MAX, group)
        tokens = torch.zeros(width, max_len, dtype=torch.long)
        for r, p in enumerate(rows):
            tokens[r, :len(p)] = torch.tensor(p)
        start = _agree(int(lengths.min()), dist.ReduceOp.MIN, group)
        ends = lengths + params.max_new_tokens          # exclusive end of each row's continuation
        done = torch.zeros(width, dtype=torch.bool)
        done[real:] = True
        stop = torch.tensor(params.stop_token_ids, dtype=torch.long)
        logprobs = torch.zeros(width, max_len)
        finished = torch.zeros(width, dtype=torch.bool)
        produced = torch.zeros(width, dtype=torch.long)
        ctx = decode_graph.StaticDecodeContext(width, max_len) if self.use_cache else None
        step = None          # the fixed-buffer decode step, made after the prefill
        pos = start          # the position whose token is chosen in this step
        prev = 0             # the first position not yet fed to the model
        while pos < max_len:
            if _agree(int((~done).any()), dist.ReduceOp.MAX, group) == 0:
                break
            feed_from = prev if self.use_cache else 0
            inp = tokens[:, feed_from:pos].to(self.device)
            if self.static_decode and prev > 0 and step is None:
                step = decode_graph.DecodeStep(self.chunks[0], ctx, width, self.device, capture=self.decode_graphs)
            if step is not None:
                logits = step(inp, prev)
            else:
                position_ids = torch.arange(feed_from, pos, device=self.device).expand(width, -1)
                logits = _pipeline_forward(self.chunks, inp, position_ids, ctx, self.hidden_size, self.dtype)
            self.stats.forward_steps += 1
            if ctx is not None:
                ctx.sequence_len_offset += pos - prev
                ctx.enable_decode_mode()
            prev = pos
            chosen = torch.zeros(width, dtype=torch.long, device=self.device)
            chosen_logp = torch.zeros(width, device=self.device)
            if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
                last = logits[:, -1, :self.vocab_size]
                chosen, chosen_logp = sample_tokens(last, params, rng)
            chosen = _broadcast_from_sampler(chosen).cpu()
            chosen_logp = _broadcast_from_sampler(chosen_logp.float()).cpu()
            in_prompt = lengths > pos
            generating = ~in_prompt & ~done & (pos < ends)
            tokens[:, pos] = torch.where(in_prompt | ~generating, tokens[:, pos], chosen)
            logprobs[:, pos] = torch.where(generating, chosen_logp, logprobs[:, pos])
            hit_stop = generating & torch.isin(chosen, stop)
            finished |= hit_stop
            produced += generating.long()
            done |= hit_stop | (generating & (pos + 1 >= ends))
            pos += 1
        out = []
        for r in range(real):
            span = slice(int(lengths[r]), int(lengths[r] + produced[r]))
            out.append(Generation(tokens[r, span].tolist(), logprobs[r, span].tolist(), bool(finished[r])))
        self.stats.per_batch.append({"rows": real, "steps": pos - start,
                                     "decode": "graph" if step is not None and step.graph is not None
                                     else "static" if step is not None else "eager"})
        return out

    def generate_sharded(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                         seed: int = 0) -> list[Generation]:
        """:meth:`generate` with the prompts split over data-parallel ranks (rank r takes prompts r,
        r + dp, ...), every rank receiving all results in prompt order. Rank r samples with seed
        ``seed + r``, so sampled results depend on the data-parallel size; greedy ones do not."""
        dp = parallel_state.get_data_parallel_world_size() if dist.is_initialized() else 1
        if dp == 1:
            return self.generate(prompts, params, seed)
        rank = parallel_state.get_data_parallel_rank()
        mine = self.generate(list(prompts[rank::dp]), params, seed + rank)
        gathered: list = [None] * dp
        dist.all_gather_object(gathered, mine, group=parallel_state.get_data_parallel_group())
        out: list[Generation] = [None] * len(prompts)  # type: ignore[list-item]
        for r, part in enumerate(gathered):
            out[r::dp] = part
        return out
