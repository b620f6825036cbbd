"""Grouped-GEMM MoE experts on ``torch._grouped_mm``: all local experts in two GEMMs, no TE needed.

megatron-core's local MoE spec runs ``SequentialMLP`` (one GEMM pair per expert, a Python loop) without
Transformer Engine; its only grouped module since 0.17 is ``TEGroupedMLP`` (TE's GroupedLinear, host
token counts). torch ships a grouped GEMM of its own (``torch._grouped_mm``: CUTLASS on sm90+, a loop
elsewhere, with autograd) that takes the token counts as a device tensor, so :class:`TorchGroupedMLP`
runs the experts without a host sync (with :mod:`megatron_ext.models.moe_dispatch`'s dispatcher).

Weights are stacked per local expert in ``SequentialMLP``'s own ``[out, in]`` layout (``weight1``:
experts x fc1-out x hidden, ``weight2``: experts x hidden x ffn) and checkpointed under
``SequentialMLP``'s sharded keys and global shapes, so model weights move between GPU and CPU runs and
across expert / tensor parallel sizes. The distributed optimizer's state does not move between the two
modules (its buffers follow the parameters), so a run resumes with the expert module it was saved with.

:func:`use_grouped_gemm` decides per config: GPUs (not the CPU backend), bf16, and only configs this
module computes as ``SequentialMLP`` does (no bias, SwiGLU/GeGLU or a plain activation, no latent
projection, no FP8, no ``moe_act`` recompute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.random import get_expert_parallel_rng_tracker_name
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


def unsupported_reason(config: TransformerConfig) -> str | None:
    """Why training should not pick :class:`TorchGroupedMLP` for this config, or None."""
    if not config.bf16:
        return "grouped experts run in bf16 only"   # torch._grouped_mm's CUDA kernels
    return _computes_differently(config)


def _computes_differently(config: TransformerConfig) -> str | None:
    """What :class:`TorchGroupedMLP` would compute differently from ``SequentialMLP``, or None."""
    if config.add_bias_linear:
        return "expert biases (add_bias_linear=True)"
    if getattr(config, "moe_latent_size", None) is not None:
        return "MoE latent projection"
    if config.fp8 or getattr(config, "fp4", None):
        return "FP8 / FP4 experts"
    if config.gated_linear_unit and config.activation_func not in (F.silu, F.gelu):
        return f"gated activation {config.activation_func.__name__}"
    if config.moe_apply_probs_on_input:
        return "moe_apply_probs_on_input"
    if config.recompute_granularity == "selective" and "moe_act" in (config.recompute_modules or []):
        return "moe_act recompute"
    ffn = (config.moe_ffn_hidden_size or config.ffn_hidden_size) // config.expert_tensor_parallel_size
    if config.hidden_size % 8 or ffn % 8:
        # torch._grouped_mm needs 16-byte row strides: multiples of 8 bf16 values
        return f"hidden {config.hidden_size} / expert FFN {ffn} per rank not multiples of 8"
    return None


def use_grouped_gemm(config: TransformerConfig) -> bool:
    """Grouped-GEMM experts on GPUs when they compute the same thing; SequentialMLP elsewhere (CPU)."""
    from megatron_ext import cpu_backend

    return torch.cuda.is_available() and not cpu_backend.is_enabled() and unsupported_reason(config) is None


class TorchGroupedMLP(MegatronModule):
    """The local experts as two ``torch._grouped_mm`` calls (SwiGLU between them, weighted by the router).

    Built by megatron-core's ``MoELayer`` like any experts module: ``(num_local_experts, config,
    pg_collection=...)``; ``forward(tokens, tokens_per_expert, probs)`` takes the tokens sorted by
    local expert and the counts as a tensor, which stays on the device.
    """

    def __init__(self, num_local_experts: int, config: TransformerConfig, submodules=None,
                 pg_collection=None, name: str | None = None):
        super().__init__(config=config)
        reason = _computes_differently(config)
        assert reason is None, f"TorchGroupedMLP cannot compute this config: {reason}"
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        ffn = divide(config.moe_ffn_hidden_size, self.tp_group.size())
        self.ffn_per_rank = ffn
        fc1_out = 2 * ffn if config.gated_linear_unit else ffn
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        kw = dict(device=device, dtype=config.params_dtype)
        self.weight1 = torch.nn.Parameter(torch.empty(num_local_experts, fc1_out, config.hidden_size, **kw))
        self.weight2 = torch.nn.Parameter(torch.empty(num_local_experts, config.hidden_size, ffn, **kw))
        if config.perform_initialization:
            # each expert drawn as its own fp32 matrix (as megatron-core's CPU initialisation draws its
            # master weights: drawing bf16 directly on the host is many times slower), on the
            # expert-parallel RNG stream as SequentialMLP's linears are, so experts on EP ranks differ
            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                for weight, init in ((self.weight1, config.init_method), (self.weight2, config.output_layer_init_method)):
                    for e in range(num_local_experts):
                        master = torch.empty(weight.shape[1:], dtype=torch.float32, device=weight.device)
                        init(master)
                        weight.data[e].copy_(master)
        for p in (self.weight1, self.weight2):
            # megatron-core's DDP keeps expert-parallel parameters out of the data-parallel all-reduce
            p.allreduce = self.ep_group.size() == 1
            p.sequence_parallel = False

    def _activation(self, fc1: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """act(fc1) x the router's weight, in the activations' dtype (megatron-core's fused SwiGLU when
        ``bias_activation_fusion`` is on, as its MLPs use it)."""
        config = self.config
        probs = probs.unsqueeze(-1)
        if config.gated_linear_unit and config.activation_func is F.silu and config.bias_activation_fusion:
            from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

            return weighted_bias_swiglu_impl(fc1, None, probs)
        if config.gated_linear_unit:
            gate, up = torch.chunk(fc1, 2, dim=-1)
            act = config.activation_func(gate) * up
        else:
            act = config.activation_func(fc1)
        return (act * probs).to(fc1.dtype)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        if x.shape[0] == 0:   # no token for any local expert: zero output, but gradients still exist
            fc1 = x @ self.weight1.flatten(0, 1).t()
            act = self._activation(fc1.view(0, self.num_local_experts, -1)[:, 0], permuted_probs)
            return act @ self.weight2[0].t(), None
        counts = tokens_per_expert if torch.is_tensor(tokens_per_expert) else torch.tensor(tokens_per_expert)
        offsets = torch.cumsum(counts.to(device=x.device, non_blocking=True), 0).to(torch.int32)
        fc1 = torch._grouped_mm(x, self.weight1.transpose(1, 2), offs=offsets)
        act = self._activation(fc1, permuted_probs)
        return torch._grouped_mm(act, self.weight2.transpose(1, 2), offs=offsets), None

    def backward_dw(self):  # megatron-core's delayed-wgrad hook: wgrad is not delayed here
        pass

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """``SequentialMLP``'s keys and global shapes: ``experts.linear_fc{1,2}.weight`` with an expert
        axis in front, fc1 split into its SwiGLU halves as megatron-core's MLP splits it."""
        if (metadata or {}).get("singleton_local_shards"):
            raise NotImplementedError("TorchGroupedMLP: singleton_local_shards checkpoints")
        axis = len(sharded_offsets)
        ep = (axis, self.ep_group.rank(), self.ep_group.size())
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()
        replica_id = (0, 0, self.dp_group.rank())

        def shard(key, tensor, *offsets):
            return ShardedTensor.from_rank_offsets(key, tensor, *sharded_offsets, ep, *offsets,
                                                   replica_id=replica_id, prepend_axis_num=axis)

        fc1_key, fc2_key = f"{prefix}experts.linear_fc1.weight", f"{prefix}experts.linear_fc2.weight"
        out = {f"{prefix}weight2": shard(fc2_key, self.weight2, (axis + 2, tp_rank, tp_size))}
        if not self.config.gated_linear_unit:
            out[f"{prefix}weight1"] = shard(fc1_key, self.weight1, (axis + 1, tp_rank, tp_size))
            return out

        def build(key, t, replica_id, flattened_range):
            w, v = torch.chunk(t, 2, dim=1)   # gate and up halves, each tensor-parallel on its own
            return [shard(key, w.contiguous(), (axis + 1, tp_rank, 2 * tp_size)),
                    shard(key, v.contiguous(), (axis + 1, tp_size + tp_rank, 2 * tp_size))]

        def merge(halves):
            return torch.cat(halves, dim=1)

        out[f"{prefix}weight1"] = ShardedTensorFactory(fc1_key, self.weight1, build, merge, replica_id)
        out.update(self._sequential_extra_states(prefix, sharded_offsets))
        return out

    def _sequential_extra_states(self, prefix: str, sharded_offsets: tuple) -> dict:
        """The (empty) ``_extra_state`` objects SequentialMLP's linears store per expert, so each
        module's checkpoint has every key the other requests; loading drops them again."""
        from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

        first = self.ep_group.rank() * self.num_local_experts
        total = self.ep_group.size() * self.num_local_experts
        replica_id = (0, self.tp_group.rank(), self.dp_group.rank())
        out = {}
        for e in range(self.num_local_experts):
            offsets = (*sharded_offsets, (len(sharded_offsets), first + e, total))
            for fc in ("linear_fc1", "linear_fc2"):
                out[f"{prefix}{fc}._extra_state{e}"] = make_sharded_object_for_checkpoint(
                    None, f"{prefix}experts.{fc}._extra_state", offsets, replica_id)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix) and "._extra_state" in k]:
            del state_dict[key]   # SequentialMLP's empty extra states (see _sequential_extra_states)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def expert_module_name(model) -> str | None:
    """The class name of the model's routed-expert modules (``TorchGroupedMLP`` / ``SequentialMLP``),
    None without MoE layers: checkpoints record it, since the two hold optimizer state differently."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, (TorchGroupedMLP, SequentialMLP)):
                return type(module).__name__
    return None
