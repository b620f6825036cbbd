"""Training checkpoints with megatron-core ``dist_checkpointing``.

Layout of a checkpoint root (one per stage)::

    checkpoints/
      iter_0000050/      dist_checkpointing folder (model, optimizer, scheduler, progress)
      iter_0000100/
      latest             text file naming the newest *complete* iteration folder

``latest`` is replaced atomically (write + ``os.replace``) only after every rank has finished writing,
so a crash during a save leaves the previous checkpoint as "latest". Checkpoints are sharded by
megatron-core's ``sharded_state_dict``, so a checkpoint saved under one parallel layout loads under
another. The distributed optimizer's state uses megatron-core's ``dp_reshardable`` format: it reloads
under any data-parallel size but only under the saved tensor/pipeline/expert sizes (``fully_reshardable``
fails in 0.16.1), so resuming under another model-parallel layout is refused with a clear error.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_ext.errors import ConfigError
from megatron_ext.mcore_compat import async_save_kwargs

LATEST_FILE = "latest"
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def iteration_dir(root: Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    marker = Path(root) / LATEST_FILE
    if not marker.exists():
        return None
    path = Path(root) / marker.read_text().strip()
    return path if path.is_dir() else None


def rng_state() -> dict:
    """Every random stream a training step can draw from on this rank."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_sharded_object(data):
    """RNG states are per rank and cannot be resharded: one shard per global rank."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", data, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def model_parallel_sizes() -> list[int]:
    """[tensor, pipeline, expert] parallel sizes of this run."""
    from megatron.core import parallel_state as ps

    return [ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_world_size()]


def _chunks(model) -> list:
    """A model chunk, or the list of a rank's chunks (virtual pipeline stages), as unwrapped modules."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [c.module if hasattr(c, "module") else c for c in chunks]


def _model_sharded_state_dict(model) -> dict:
    """Chunks are keyed ``chunk<i>``; their tensors carry global keys and layer offsets, so the
    nesting does not matter when a checkpoint is loaded under another (virtual) pipeline split."""
    chunks = _chunks(model)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save(root: Path, step: int, model, optimizer=None, scheduler=None, progress: dict | None = None,
         keep_last: int | None = None, async_writer: "AsyncCheckpointWriter | None" = None) -> Path:
    """Save a checkpoint collectively on all ranks and mark it latest once complete.

    With ``async_writer`` the shards are written by a background process while training goes on,
    and the checkpoint becomes latest when the writer finalizes it (see :class:`AsyncCheckpointWriter`).
    """
    root = Path(root)
    path = iteration_dir(root, step)
    if dist.get_rank() == 0:
        if path.exists():  # a leftover of an interrupted save of this same step
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    state: dict[str, Any] = {"model": _model_sharded_state_dict(model)}
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)  # a save before the first update has none yet
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=_OPTIMIZER_METADATA)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["progress"] = dict(progress or {}, step=step, world_size=dist.get_world_size(),
                             model_parallel=model_parallel_sizes(), expert_module=_expert_module(model))
    state["rng_state"] = _rng_sharded_object(rng_state())
    if async_writer is not None:
        async_writer.schedule(state, path, lambda: _mark_latest(root, path, keep_last))
        return path
    dist_checkpointing_save(state, str(path))
    dist.barrier()
    _mark_latest(root, path, keep_last)
    dist.barrier()
    return path


def _mark_latest(root: Path, path: Path, keep_last: int | None) -> None:
    """Rank 0 points ``latest`` at a checkpoint every rank has finished writing."""
    if dist.get_rank() == 0:
        tmp = root / (LATEST_FILE + ".tmp")
        tmp.write_text(path.name + "\n")
        os.replace(tmp, root / LATEST_FILE)
        if keep_last:
            _prune(root, keep_last)


class AsyncCheckpointWriter:
    """megatron-core's asynchronous ``dist_checkpointing`` save, with our "latest" commit.

    megatron-core's own writer (0.19 defaults to nvidia-resiliency-ext's, which it does not install:
    :func:`~megatron_ext.mcore_compat.async_save_kwargs`). ``schedule`` copies the state to host memory
    and forks a writer process; :meth:`finalize` (called
    by the trainer every step, and blocking before it exits) checks collectively whether every rank's
    writer finished, then runs megatron-core's finalization (the checkpoint metadata) and marks the
    checkpoint latest. A kill before that leaves the previous checkpoint latest. The writer reports
    through megatron-core's multiprocessing Manager queue, whose server process outlives a SIGKILLed
    trainer: use a launcher that cleans up its process group (SLURM does).
    """

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies import filesystem_async
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        if filesystem_async._results_queue is not None and not hasattr(filesystem_async._results_queue, "_callmethod"):
            filesystem_async._results_queue = None  # the in-process queue of sync saves cannot cross processes
        self._queue = AsyncCallsQueue()

    def schedule(self, state: dict, path: Path, commit) -> None:
        from megatron.core import dist_checkpointing

        request = dist_checkpointing.save(state, str(path), async_sharded_save=True, **async_save_kwargs())
        request.add_finalize_fn(commit)
        self._queue.schedule_async_request(request)

    def finalize(self, blocking: bool = False) -> None:
        self._queue.maybe_finalize_async_calls(blocking=blocking)

    def pending(self) -> int:
        return self._queue.get_num_unfinalized_calls()


def dist_checkpointing_save(state: dict, path: str) -> None:
    """The write itself (one name, so fault-injection tests can interrupt a save here).

    Saves are synchronous, so the writer's results can travel through an in-process queue. megatron-core
    would otherwise start a ``multiprocessing`` Manager server process on the first save: it re-imports
    ``__main__``, costs a process per rank, and outlives a SIGKILLed trainer, keeping its stdout open
    (a launcher reading that pipe would wait forever).
    """
    import queue

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:  # (an async writer may have set a Manager queue)
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(state, path)


def _prune(root: Path, keep_last: int) -> None:
    iters = sorted(p for p in root.glob("iter_*") if p.is_dir())
    latest = latest_checkpoint(root)
    for old in iters[:-keep_last]:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam the state it would create lazily (zero moments, step 0).

    Without TE/apex, megatron-core's distributed optimizer reads every parameter's ``step`` when it
    builds a sharded state dict (to save, or as the request of a load), and a freshly built optimizer
    has no state yet. The values equal torch's lazy initialisation, so training is unchanged; unlike
    a dummy ``step()`` this leaves the weights untouched.
    """
    inner_optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    for inner in inner_optimizers:
        torch_opt = inner.optimizer
        for group in torch_opt.param_groups:
            for p in group["params"]:
                state = torch_opt.state[p]
                if not state:
                    state["step"] = _adam_step(group, p, 0.0)
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)


def _restore_adam_steps(optimizer) -> None:
    """Set every parameter's Adam ``step`` from its param group's checkpointed step.

    megatron-core 0.16.1's distributed optimizer without TE/apex keeps the checkpointed step only in
    the param groups; the per-parameter ``step`` tensors end up holding the placeholder it was asked
    to load into (or one tensor shared by all parameters, which torch's foreach Adam increments once
    per parameter). Either way bias correction goes wrong from the first update after a resume.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = inner.optimizer
        for group in torch_opt.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                torch_opt.state[p]["step"] = _adam_step(group, p, float(group["step"]))


def _adam_step(group: dict, param: torch.Tensor, value: float) -> torch.Tensor:
    """An Adam ``step`` tensor where torch keeps it: on the parameter's device for the fused kernel
    (``optim.use_fused_adam``), a CPU scalar otherwise."""
    if group.get("fused"):
        return torch.tensor(value, dtype=torch.float32, device=param.device)
    return torch.tensor(value)


def _expert_module(model) -> str | None:
    from megatron_ext.models.grouped_experts import expert_module_name

    return expert_module_name(_chunks(model))


def check_same_expert_module(path, saved: str | None, current: str | None) -> None:
    """Grouped and sequential experts read each other's weights but not each other's optimizer state
    (its buffers follow the parameters: stacked or one per expert), so a resume must build the saved
    kind (checkpoints from before megatron-core 0.19 say ``GroupedMLP``, megatron-core's old module)."""
    if saved is not None and current is not None and saved != current:
        raise ConfigError(
            f"{path} was saved with {saved} experts; this run builds {current} (grouped GEMM is picked "
            f"on GPUs in bf16, SequentialMLP on CPU / fp32: megatron_ext.models.grouped_experts). Model "
            f"weights load into either, the optimizer state does not: resume on the kind of machine and "
            f"precision that saved it, or start a new stage from these weights with init_from={path} "
            f"(a fresh optimizer)"
        )


def load(path: Path, model, optimizer=None, scheduler=None, restore_rng: bool = False) -> dict:
    """Load model (and optimizer/scheduler when given) in place; returns the saved progress dict.

    Loading only the model is how a stage starts from its parent stage's checkpoint. ``restore_rng``
    (a resume) also restores every rank's random streams when the world size is unchanged; under a
    new layout they cannot be matched to ranks, so they start fresh and the progress says so.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    model_sd = _model_sharded_state_dict(model)
    request: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=_OPTIMIZER_METADATA
        )
    saved = dist_checkpointing.load_common_state_dict(str(path)).get("progress", {})
    saved_world = saved.get("world_size")
    if optimizer is not None and saved.get("model_parallel", model_parallel_sizes()) != model_parallel_sizes():
        raise ConfigError(
            f"{path} was saved with tensor/pipeline/expert parallel sizes {saved['model_parallel']}; "
            f"this run uses {model_parallel_sizes()}. Model weights reshard to any layout, but the "
            f"distributed optimizer's state reshards across data parallelism only: resume with the "
            f"saved tensor/pipeline/expert sizes (the data-parallel size may change), or start a new "
            f"stage from these weights with init_from={path} (a fresh optimizer)"
        )
    if optimizer is not None:
        check_same_expert_module(path, saved.get("expert_module"), _expert_module(model))
    rng = restore_rng and saved_world == dist.get_world_size()
    if rng:
        request["rng_state"] = _rng_sharded_object(None)
    with torch.no_grad():  # the optimizer copies into views of leaf parameters
        loaded = dist_checkpointing.load(request, str(path), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
        chunks = _chunks(model)
        if len(chunks) == 1:
            chunks[0].load_state_dict(loaded["model"])
        else:
            for i, chunk in enumerate(chunks):
                chunk.load_state_dict(loaded["model"][f"chunk{i}"])
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_steps(optimizer)
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    if rng:
        set_rng_state(loaded["rng_state"])
    return dict(loaded.get("progress", {}), rng_restored=rng)
