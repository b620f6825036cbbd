"""The training loop around megatron-core's forward/backward schedules.

Reads top to bottom: for each step, run the schedule over the step's micro-batches (gradient
accumulation and pipeline parallelism are megatron-core's), step the optimizer and LR schedule, log,
evaluate and checkpoint at their intervals. The step number is the whole data-loader state: batches
are a pure function of (step, micro-batch, data-parallel rank), so a resumed run sees exactly the
samples the interrupted one would have.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext import checkpointing
from megatron_ext.mcore_compat import batch_on_this_cp_rank
from megatron_ext.fault_tolerance import Preempted, PreemptionGuard, TrainingDiverged
from megatron_ext.metrics import MetricsWriter
from megatron_ext.optim import step_if_finite


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    resumed_from_step: int | None = None


class StepBatches:
    """Deterministic micro-batches of a map-style dataset for a given step.

    Global batch ``step`` covers samples ``[step * G, (step + 1) * G)`` (G = global batch size);
    micro-batch ``m`` of data-parallel rank ``r`` is the slice starting at ``(m * DP + r) * B``.
    """

    def __init__(self, dataset, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int):
        per_step = micro_batch_size * dp_size
        if global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={global_batch_size} must be a multiple of "
                f"micro_batch_size x data_parallel = {per_step}"
            )
        self.dataset = dataset
        self.mbs = micro_batch_size
        self.gbs = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.num_microbatches = global_batch_size // per_step

    def microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for m in range(self.num_microbatches):
            start = step * self.gbs + (m * self.dp_size + self.dp_rank) * self.mbs
            samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(self.mbs)]
            out.append({k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]})
        return out


def masked_mean_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Mean loss over the micro-batch's unmasked tokens; ``lm_loss`` reports [sum, count].

    Under context parallelism each rank holds 2 of 2 x CP chunks of every sequence: the mean is over
    the whole sequences' tokens (the count summed over the CP group; the sum stays local, so each
    rank's gradient is its own tokens' share). megatron-core's schedule multiplies a (loss, report)
    result by the CP size, which undoes DDP's average over data x context ranks.
    """
    mask = loss_mask.float()
    total = (per_token_loss.float() * mask).sum()
    count = mask.sum()
    whole = count.detach()
    if parallel_state.get_context_parallel_world_size() > 1:
        whole = whole.clone()
        dist.all_reduce(whole, group=parallel_state.get_context_parallel_group())
    loss = total / whole.clamp(min=1)
    return loss, {"lm_loss": torch.stack([total.detach(), count.detach()])}


def lm_forward_step(batch_iter, model):
    """megatron-core forward step for causal LM batches from :class:`StepBatches`: under context
    parallelism each rank keeps its two load-balanced chunks of every row (megatron-core's order)."""
    batch = next(batch_iter)
    if parallel_state.get_context_parallel_world_size() > 1:
        batch = batch_on_this_cp_rank(batch, parallel_state.get_context_parallel_group())
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, lambda out: masked_mean_loss(batch["loss_mask"], out)


def moe_aux_losses(num_microbatches: int, num_layers: int) -> dict[str, list[float]]:
    """This step's MoE auxiliary losses per layer, reduced over ranks, then cleared.

    megatron-core's routers add each micro-batch's aux loss to a global per-layer tracker; this
    averages over micro-batches (as Megatron-LM's ``track_moe_metrics`` does) and over data-parallel
    ranks, and sums the pipeline stages' layers.
    """
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) > 1:
        # the reduction is collective per name: a stage without MoE layers must join it too
        names: list = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(names, sorted(tracker), group=pp_group)
        for name in set().union(*names) - set(tracker):
            tracker[name] = {"values": torch.zeros(num_layers), "reduce_group": None, "avg_group": None}
    if not tracker:
        return {}
    reduce_aux_losses_tracker_across_ranks()
    out = {name: (entry["values"].float() / num_microbatches).tolist() for name, entry in sorted(tracker.items())}
    clear_aux_losses_tracker()
    return out


def _reduce_lm_loss(losses: Sequence[dict]) -> float:
    """Token-weighted mean LM loss of one step across micro-batches, data- and context-parallel ranks."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        totals = torch.zeros(2)
    else:
        totals = torch.stack([d["lm_loss"] for d in losses]).sum(0) if losses else torch.zeros(2)
    totals = totals.to(torch.float64)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    # the last pipeline stage holds the loss; share it with the other stages
    dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return float(totals[0] / totals[1].clamp(min=1))


class Trainer:
    def __init__(
        self,
        model: list,
        optimizer,
        scheduler,
        train_cfg: Mapping[str, Any],
        train_batches: StepBatches,
        valid_batches: StepBatches | None,
        checkpoint_root: Path,
        metrics: MetricsWriter,
        seq_length: int,
        forward_step: Callable = lm_forward_step,
        on_checkpoint: Callable[[TrainState, Path], None] | None = None,
    ):
        self.chunks = list(model)  # DDP-wrapped model chunks (one per virtual pipeline stage)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.cfg = train_cfg
        self.train_batches = train_batches
        self.valid_batches = valid_batches
        self.checkpoint_root = Path(checkpoint_root)
        self.metrics = metrics
        self.seq_length = seq_length
        self.forward_step = forward_step
        self.on_checkpoint = on_checkpoint
        self.state = TrainState()
        self.async_writer = checkpointing.AsyncCheckpointWriter() if train_cfg.get("async_save") else None
        self._consecutive_skips = 0
        self.num_layers = self.chunks[0].config.num_layers
        self._fwd_bwd = get_forward_backward_func()
        # optional: more metrics for each logged step (e.g. RL's KL and clip fraction)
        self.step_metrics_fn: Callable[[], dict] | None = None

    # -- state ---------------------------------------------------------------------------------
    def restore(self, parent_checkpoint: str | None) -> None:
        """Resume from this stage's latest checkpoint, else start from the parent stage's weights."""
        latest = checkpointing.latest_checkpoint(self.checkpoint_root)
        if latest is not None:
            progress = checkpointing.load(latest, self.chunks, self.optimizer, self.scheduler, restore_rng=True)
            self.state.step = int(progress["step"])
            self.state.tokens_seen = int(progress.get("tokens_seen", 0))
            self.state.resumed_from_step = self.state.step
        elif parent_checkpoint:
            checkpointing.load(Path(parent_checkpoint), self.chunks)

    def save(self) -> Path:
        path = checkpointing.save(
            self.checkpoint_root,
            self.state.step,
            self.chunks,
            self.optimizer,
            self.scheduler,
            progress={"tokens_seen": self.state.tokens_seen},
            keep_last=self.cfg.get("keep_last_checkpoints"),
            async_writer=self.async_writer,
        )
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.state, path)
        return path

    # -- steps ---------------------------------------------------------------------------------
    def _run_schedule(self, microbatches: list[dict], forward_only: bool) -> list[dict]:
        # each chunk reads the step's micro-batches (only the first and last stages use them), moved to
        # the model's device one at a time as the schedule asks for them (datasets yield CPU tensors)
        device = next(self.chunks[0].parameters()).device

        def on_device():
            for batch in microbatches:
                yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

        data = [on_device() for _ in self.chunks] if len(self.chunks) > 1 else on_device()
        # the step's own length (RL rows are cut to their rollout's longest sequence): pipeline stages
        # exchange [seq, mbs, hidden] tensors of this shape
        first = microbatches[0] if microbatches else {}
        seq_length = first["tokens"].shape[-1] if torch.is_tensor(first.get("tokens")) else self.seq_length
        return self._fwd_bwd(
            forward_step_func=self.forward_step,
            data_iterator=data,
            model=self.chunks,
            num_microbatches=len(microbatches),
            seq_length=seq_length,
            micro_batch_size=self.train_batches.mbs,
            forward_only=forward_only,
        )

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; a non-finite loss or gradient skips the update (see fault_tolerance)."""
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run_schedule(self.train_batches.microbatches(self.state.step), forward_only=False)
        loss = _reduce_lm_loss(losses)
        lrs = self._group_lrs()  # the LRs this update uses
        # megatron-core's per-layer router aux losses (the switch load-balancing loss is 1 per layer
        # at perfect balance): the sum for the progress line, the list for per-layer balance plots
        aux = {}
        for name, per_layer in moe_aux_losses(self.train_batches.num_microbatches, self.num_layers).items():
            aux[name], aux[f"{name}_per_layer"] = sum(per_layer), per_layer
        self.state.step += 1
        self.state.tokens_seen += self.train_batches.gbs * self.seq_length
        update_ok, grad_norm = step_if_finite(self.optimizer) if math.isfinite(loss) else (False, None)
        if update_ok:
            self.scheduler.step(increment=1)
            self._consecutive_skips = 0
        else:
            self._consecutive_skips += 1
            limit = int(self.cfg.get("max_skipped_steps", 5))
            if dist.get_rank() == 0:
                print(f"step {self.state.step}: non-finite loss or gradient (loss={loss}); update skipped "
                      f"({self._consecutive_skips} in a row, limit {limit})", flush=True)
            if self._consecutive_skips >= limit:
                latest = checkpointing.latest_checkpoint(self.checkpoint_root)
                raise TrainingDiverged(
                    f"{self._consecutive_skips} consecutive steps (up to step {self.state.step}) had a "
                    f"non-finite loss or gradient; stopping. The last good checkpoint is {latest}. Lower "
                    f"train.lr, check the data, or raise train.max_skipped_steps"
                )
        return {
            **aux,
            "loss": loss,
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            **lrs,
            "update_skipped": not update_ok,
        }

    def _group_lrs(self) -> dict[str, float]:
        """``lr`` of the default param groups, ``lr_experts`` of scaled routed-expert groups."""
        out: dict[str, float] = {}
        for group in self.optimizer.param_groups:
            key = "lr" if group.get("lr_mult", 1.0) == 1.0 else "lr_experts"
            out.setdefault(key, float(group["lr"]))
        return out

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.valid_batches is None:
            return None
        for chunk in self.chunks:
            chunk.eval()
        losses = []
        for i in range(int(self.cfg.get("eval_iters", 1))):
            losses.extend(self._run_schedule(self.valid_batches.microbatches(i), forward_only=True))
        for chunk in self.chunks:
            chunk.train()
        moe_aux_losses(1, self.num_layers)  # evaluation's aux losses are not training's: drop them
        return _reduce_lm_loss(losses)

    # -- loop ----------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        total = int(self.cfg["steps"])
        log_every = int(self.cfg.get("log_interval", 1))
        save_every = int(self.cfg.get("save_interval", 0)) or total
        eval_every = int(self.cfg.get("eval_interval", 0)) or total
        is_main = dist.get_rank() == 0
        bar = None
        if is_main:
            from tqdm import tqdm

            # at most one refresh a second keeps logs (worker.log, CI) readable
            bar = tqdm(total=total, initial=self.state.step, desc="train", unit="step", mininterval=1.0,
                       dynamic_ncols=True)
        last: dict[str, float] = {}
        with PreemptionGuard() as preemption:
            while self.state.step < total:
                last = self._fit_step(total, log_every, eval_every, save_every, bar)
                if self.async_writer is not None:
                    self.async_writer.finalize(blocking=False)
                signal_name = preemption.requested()
                if signal_name and self.state.step < total:
                    if self.state.step % save_every and self.state.step != total:
                        self.save()
                    self.finish_saves()
                    if bar is not None:
                        bar.close()
                    raise Preempted(self.state.step, signal_name)
        self.finish_saves()
        if bar is not None:
            bar.close()
        return last

    def finish_saves(self) -> None:
        """Wait for asynchronous checkpoint writes and mark them latest (no-op for sync saves)."""
        if self.async_writer is not None:
            self.async_writer.finalize(blocking=True)

    def _fit_step(self, total: int, log_every: int, eval_every: int, save_every: int, bar) -> dict:
        """One step of :meth:`fit` with its logging, evaluation and checkpoint."""
        t0 = time.perf_counter()
        last = self.train_step()
        dt = time.perf_counter() - t0
        tokens_per_s = self.train_batches.gbs * self.seq_length / dt
        step = self.state.step
        if self.step_metrics_fn is not None:
            last.update(self.step_metrics_fn())
        if step % log_every == 0 or step == total:
            self.metrics.write(step, {**last, "tokens_per_s": tokens_per_s,
                                      "tokens_seen": self.state.tokens_seen, "step_time_s": dt})
        if step % eval_every == 0 or step == total:
            last["valid_loss"] = self.evaluate()
            if last["valid_loss"] is not None:
                self.metrics.write(step, {"loss": last["valid_loss"]}, split="valid")
        if step % save_every == 0 or step == total:
            self.save()
        if bar is not None:
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                            refresh=False)
            bar.update(1)
        return last
