"""Sequence-parallel communication overlapped with the GEMMs, without Transformer Engine.

Under sequence parallelism every column-parallel linear all-gathers its input along the sequence before
its GEMM, and every row-parallel linear reduce-scatters its GEMM output. megatron-core 0.16.1's local
layers (``LinearWithGradAccumulationAndAsyncCommunication``) already overlap the backward's re-gather
and dgrad reduce-scatter with the GEMMs, but run the forward's all-gather and reduce-scatter and the
row-parallel backward's all-gather synchronously: on two H200s those made 19.7% of a TP2 dense step's
kernel time (issue 10; benchmarks/results/train_step_dense_tp2_mb4_profile_h200.json). megatron-core's
answer, ``tp_comm_overlap``, is TE's userbuffers only. Here the same flag drives two torch-only layers:

- :class:`OverlappedColumnParallelLinear`: starts the all-gather, multiplies the local shard into its
  rows of the output meanwhile, then the gathered shards. Backward is megatron-core's (same ctx).
- :class:`OverlappedRowParallelLinear`: splits the GEMM into chunks of output rows, each chunk holding
  rows of every rank's sequence block, and reduce-scatters a chunk while the next one computes.
  Backward all-gathers the output gradient while the local rows' dgrad computes.

Each output row is the same dot products in the same dtype as megatron-core's layers compute, and the
collectives are the same, so results match them (tests/megatron_ext/models/test_tp_comm_overlap.py).
The kernels are queued in that order (collective before the GEMM it hides behind), which is what
``CUDA_DEVICE_MAX_CONNECTIONS=1`` preserves, as megatron-core's overlap needs (launch/conf/cluster).
Anything else (no sequence parallelism, frozen weights, deferred embedding wgrad, autocast, CPU
offloading, expert layers) runs megatron-core's own path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.parallel_state import get_global_memory_buffer
from megatron.core.tensor_parallel import layers
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, LinearWithGradAccumulationAndAsyncCommunication,
                                                  RowParallelLinear, custom_bwd, custom_fwd)
from megatron.core.transformer import TransformerConfig

from megatron_ext.errors import ConfigError

#: Chunks of each rank's sequence block in the row-parallel forward: the last chunk's reduce-scatter is
#: the part left exposed; more chunks hide more of it behind smaller GEMMs and more collective launches.
ROW_CHUNKS = 2


def wanted(setting: bool | None, sequence_parallel: bool) -> bool:
    """``parallel.tp_comm_overlap``: None (auto) turns the overlap on for GPU runs with sequence
    parallelism, where it saves time; True forces it (tests run it on CPU), False keeps megatron-core's."""
    from megatron_ext import cpu_backend

    if setting is None:
        return sequence_parallel and torch.cuda.is_available() and not cpu_backend.is_enabled()
    if setting and not sequence_parallel:
        raise ConfigError("parallel.tp_comm_overlap=true overlaps the sequence-parallel collectives: it needs "
                          "parallel.sequence_parallel=true and tensor_model_parallel_size > 1 (or set it to null)")
    return bool(setting)


def linear_classes(config: TransformerConfig) -> tuple[type, type]:
    """(column-parallel, row-parallel) linear classes for a layer spec under ``config``."""
    if config.tp_comm_overlap:
        return OverlappedColumnParallelLinear, OverlappedRowParallelLinear
    return ColumnParallelLinear, RowParallelLinear


def _overlappable(weight: torch.Tensor, tp_group) -> bool:
    return weight.requires_grad and not torch.is_autocast_enabled("cuda") and tp_group.size() > 1


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[s, ..., h] -> [s * ..., h]: rows in sequence-major order, so a sequence block is a row block."""
    return t.reshape(-1, t.shape[-1])


class _GatherThenLinear(LinearWithGradAccumulationAndAsyncCommunication):
    """megatron-core's column-parallel Function with the forward's all-gather overlapped; its backward
    (async re-gather, dgrad reduce-scatter behind the wgrad GEMM) reads the same ctx fields."""

    @staticmethod
    @custom_fwd
    def forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                grad_output_buffer, wgrad_deferral_limit, tp_group):
        assert sequence_parallel and not allreduce_dgrad and grad_output_buffer is None
        ctx.save_for_backward(input, weight)
        fused = gradient_accumulation_fusion and hasattr(weight, "main_grad")
        ctx.main_grad = weight.main_grad if fused else None
        ctx.use_bias = bias is not None
        ctx.gradient_accumulation_fusion = gradient_accumulation_fusion
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.sequence_parallel = sequence_parallel
        ctx.wgrad_deferral_limit = wgrad_deferral_limit
        ctx.grad_output_buffer = grad_output_buffer
        ctx.tp_group = tp_group
        ctx.gtp_remat_size = 1   # megatron-core 0.19's backward reads it (weights sharded beyond TP: not here)

        tp, rank = tp_group.size(), tp_group.rank()
        local = input.contiguous()
        gathered = get_global_memory_buffer().get_tensor([local.shape[0] * tp, *local.shape[1:]], local.dtype, "mpu")
        handle = dist.all_gather_into_tensor(gathered, local, group=tp_group, async_op=True)
        output = local.new_empty((local.shape[0] * tp, *local.shape[1:-1], weight.shape[0]))
        blocks = _rows(output).view(tp, -1, weight.shape[0])   # the output rows of each rank's block
        torch.mm(_rows(local), weight.t(), out=blocks[rank])
        handle.wait()
        shards = _rows(gathered).view(tp, -1, local.shape[-1])
        for r in range(tp):
            if r != rank:
                torch.mm(shards[r], weight.t(), out=blocks[r])
        if bias is not None:
            output += bias
        return output


class _LinearThenReduceScatter(torch.autograd.Function):
    """``reduce_scatter(input @ weight.T)`` along the sequence, the GEMM in chunks that each reduce-scatter
    while the next computes; backward all-gathers the gradient while the local rows' dgrad computes."""

    @staticmethod
    @custom_fwd
    def forward(ctx, input, weight, gradient_accumulation_fusion, tp_group):
        ctx.save_for_backward(input, weight)
        fused = gradient_accumulation_fusion and hasattr(weight, "main_grad")
        ctx.main_grad = weight.main_grad if fused else None
        ctx.gradient_accumulation_fusion = gradient_accumulation_fusion
        ctx.tp_group = tp_group

        tp = tp_group.size()
        if input.shape[0] % tp:
            raise ValueError(f"sequence length {input.shape[0]} is not divisible by tensor parallel size {tp}")
        x = _rows(input).view(tp, -1, input.shape[-1])   # [rank block, rows, in]
        rows = x.shape[1]
        chunks = ROW_CHUNKS if rows % ROW_CHUNKS == 0 else 1
        step = rows // chunks
        output = input.new_empty((input.shape[0] // tp, *input.shape[1:-1], weight.shape[0]))
        out_rows = _rows(output)
        pending = []
        for c in range(chunks):
            partial = input.new_empty((tp, step, weight.shape[0]))
            for r in range(tp):
                torch.mm(x[r, c * step:(c + 1) * step], weight.t(), out=partial[r])
            # rank r receives the sum of every rank's partial[r]: its block's rows of chunk c
            handle = dist.reduce_scatter_tensor(out_rows[c * step:(c + 1) * step], partial.view(tp * step, -1),
                                                group=tp_group, async_op=True)
            pending.append((partial, handle))
        for _, handle in pending:
            handle.wait()
        return output

    @staticmethod
    @custom_bwd
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        tp_group = ctx.tp_group
        tp, rank = tp_group.size(), tp_group.rank()
        grad_local = grad_output.contiguous()
        grad_full = get_global_memory_buffer().get_tensor(
            [grad_local.shape[0] * tp, *grad_local.shape[1:]], grad_local.dtype, "mpu")
        handle = dist.all_gather_into_tensor(grad_full, grad_local, group=tp_group, async_op=True)
        grad_input = grad_local.new_empty(input.shape)
        dgrad_blocks = _rows(grad_input).view(tp, -1, input.shape[-1])
        torch.mm(_rows(grad_local), weight, out=dgrad_blocks[rank])
        handle.wait()
        g_blocks = _rows(grad_full).view(tp, -1, grad_local.shape[-1])
        for r in range(tp):
            if r != rank:
                torch.mm(g_blocks[r], weight, out=dgrad_blocks[r])
        grad_weight = _weight_gradient(ctx, weight, _rows(grad_full), _rows(input.contiguous()))
        return grad_input, grad_weight, None, None


def _weight_gradient(ctx, weight: torch.Tensor, grad_output: torch.Tensor, total_input: torch.Tensor):
    """The wgrad as megatron-core's linear backward returns it (2-D operands): accumulated into
    ``main_grad`` with gradient-accumulation fusion, a dummy its DDP hook skips in its place."""
    if not ctx.gradient_accumulation_fusion:
        return grad_output.t().matmul(total_input)
    weight.main_grad = ctx.main_grad
    kernel = layers.fused_weight_gradient_mlp_cuda
    if weight.main_grad.dtype == torch.float32:
        kernel.wgrad_gemm_accum_fp32(total_input, grad_output, weight.main_grad)
    else:
        kernel.wgrad_gemm_accum_fp16(total_input, grad_output, weight.main_grad)
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(weight.main_grad.shape, dtype=total_input.dtype, device=total_input.device)


class OverlappedColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` whose sequence-parallel all-gather overlaps the local shard's GEMM."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if (kwargs.get("sequence_parallel") and kwargs.get("grad_output_buffer") is None
                and not kwargs.get("allreduce_dgrad") and kwargs.get("gtp_remat_size", 1) <= 1
                and _overlappable(weight, kwargs["tp_group"])):
            return _GatherThenLinear.apply(input, weight, kwargs["bias"], kwargs["gradient_accumulation_fusion"],
                                           False, True, None, kwargs["wgrad_deferral_limit"], kwargs["tp_group"])
        return super()._forward_impl(input, weight, *args, **kwargs)


class OverlappedRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` whose sequence-parallel reduce-scatter overlaps the next chunk's GEMM."""

    def forward(self, input_):
        if (not self.sequence_parallel or self.explicit_expert_comm or not self.input_is_parallel
                or self.config._cpu_offloading_context is not None or not _overlappable(self.weight, self.tp_group)):
            return super().forward(input_)
        output = _LinearThenReduceScatter.apply(input_, self.weight, self.gradient_accumulation_fusion, self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None

