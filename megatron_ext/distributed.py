"""Process-group and model-parallel set-up for one stage worker (started by torchrun).

Backend follows the hardware: NCCL (plus gloo for CPU tensors) on GPUs, gloo (with
:mod:`megatron_ext.cpu_backend`) on CPU.
Seeding follows Megatron-LM: the base seed is offset per pipeline rank, and megatron-core's named RNG
streams give tensor-parallel ranks distinct dropout while data-parallel ranks agree.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from megatron_ext import cpu_backend


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    ep: int
    dp: int
    cpu: bool
    cp: int = 1   # context-parallel ranks (each holds 2 of 2 x cp sequence chunks)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def initialize(parallel_cfg: Mapping[str, Any], seed: int, timeout_minutes: int = 10) -> DistEnv:
    """Start the process group (from torchrun's environment) and megatron-core's parallel state."""
    from megatron.core import parallel_state

    cpu = cpu_backend.enable_if_needed()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not cpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # On GPUs both: NCCL for CUDA tensors, gloo for the small CPU tensors that steer the loop
        # (loss totals, flags, generation's lock-step counters); groups megatron-core creates without
        # a backend inherit both.
        # One process needs no rendezvous: an in-memory store, so no port can be taken by another
        # job between the launcher choosing it and this process binding it (EADDRINUSE).
        dist.init_process_group(
            backend="gloo" if cpu else "cpu:gloo,cuda:nccl",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **({"store": dist.HashStore()} if world == 1 else {}),
        )
    tp = int(parallel_cfg["tensor_model_parallel_size"])
    pp = int(parallel_cfg["pipeline_model_parallel_size"])
    ep = int(parallel_cfg["expert_model_parallel_size"])
    cp = int(parallel_cfg.get("context_parallel_size") or 1)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        virtual_pipeline_model_parallel_size=parallel_cfg.get("virtual_pipeline_model_parallel_size"),
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_all(seed)
    return DistEnv(rank, world, local_rank, tp, pp, ep, parallel_state.get_data_parallel_world_size(), cpu, cp)


def seed_all(seed: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
