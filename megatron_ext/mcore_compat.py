"""The differences between the megatron-core releases we support, in one place.

Supported: 0.19.x (Python >= 3.12; what CI and the GPU benchmarks run) and 0.16.1 (the last release for
Python 3.11; a smoke subset in CI). Code elsewhere asks here instead of testing versions itself.

- 0.17 passes ``name=`` (the module's dotted path) to every module it builds from a spec; 0.16's
  modules do not accept it. Our modules take it and hand it on with :func:`name_kwargs`.
- 0.17 turned the MoE spec into ``functools.partial(MoELayer, submodules=...)`` (a ``ModuleSpec``
  before): :func:`moe_submodules`, :func:`build_spec`.
- 0.16's ``moe_utils`` leaves ``te_general_gemm`` and the ``fused_*`` kernels unbound without
  Transformer Engine (NameError in the router); 0.19 binds them to None itself: :func:`bind_missing_te_names`.
- 0.19 serves a static inference context's Mamba states and last-token logits only under its
  process-wide ``InferenceMode`` flag (0.16: whenever a context is passed): :func:`inference_mode`.
- 0.19's asynchronous checkpoint save defaults to nvidia-resiliency-ext's writer, which it does not
  depend on; ours is megatron-core's own, with its own queue: :func:`async_save_kwargs`.
- 0.18 renamed ``MambaModel`` / ``mamba_stack_spec`` / ``hybrid_override_pattern`` to ``HybridModel`` /
  ``hybrid_stack_spec`` / ``hybrid_layer_pattern``: :func:`hybrid_model_class`, :func:`hybrid_model_kwargs`.
- 0.19's ``get_batch_on_this_cp_rank`` also dispatches packed / hybrid CP and takes ``is_hybrid_cp``
  (0.16: ``(batch, cp_group)``): :func:`batch_on_this_cp_rank`.
- 0.19 made Mamba's conv bare parameters (``conv1d_weight``), checkpointed under the old
  ``conv1d.weight`` keys: :func:`canonical_name` and friends.

Handled where they arise (each says so): 0.17 dropped the non-TE ``GroupedMLP`` and changed
``grouped_mlp_modules``' return type (``models.grouped_experts.TorchGroupedMLP``,
``models.sdpa_attention.FastSpecProvider``); routers take extra keywords (``RecycleRouter``); 0.19's
linear backward reads ``ctx.gtp_remat_size`` (``models.tp_comm_overlap``); 0.19 dropped the load
strategy base class (``hf.checkpoint_layers``); 0.19's static-batching Mamba decode step reads its
input batch-major (``models.mamba_static_decode``).
"""

from __future__ import annotations

import contextlib
import functools
from importlib import metadata

import torch
from packaging.version import Version

MCORE_VERSION = Version(metadata.version("megatron-core"))
#: megatron-core >= 0.17: modules get ``name=``, specs may be builders (partials), HybridModel (0.18).
MCORE_017 = MCORE_VERSION >= Version("0.17.0")


def name_kwargs(name: str | None) -> dict:
    """``{"name": name}`` for a megatron-core base class that takes it (0.17+), else nothing."""
    return {"name": name} if name is not None and MCORE_017 else {}


def moe_submodules(spec):
    """The ``MoESubmodules`` of a MoE spec: a ``ModuleSpec`` (0.16) or a ``partial`` (0.17+)."""
    return spec.keywords["submodules"] if hasattr(spec, "keywords") else spec.submodules


def hybrid_model_class():
    """``HybridModel`` (0.18+) or ``MambaModel`` (0.16)."""
    try:
        from megatron.core.models.hybrid.hybrid_model import HybridModel
    except ImportError:
        from megatron.core.models.mamba import MambaModel as HybridModel
    return HybridModel


def hybrid_model_kwargs(stack_spec, layer_pattern: str) -> dict:
    """The stack spec and layer pattern under the keyword names of this megatron-core."""
    if hybrid_model_class().__name__ == "HybridModel":
        return {"hybrid_stack_spec": stack_spec, "hybrid_layer_pattern": layer_pattern}
    return {"mamba_stack_spec": stack_spec, "hybrid_override_pattern": layer_pattern}


def build_spec(spec, *args, **kwargs):
    """Build a module from a spec: a ``ModuleSpec`` or class (``build_module``), or a builder such as
    0.17+'s ``partial(MoELayer, submodules=...)`` (called)."""
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    if isinstance(spec, (ModuleSpec, type)):
        return build_module(spec, *args, **kwargs)
    return spec(*args, **kwargs)


#: Parameters megatron-core renamed in the module tree but not in checkpoints: 0.19 made Mamba's conv
#: bare parameters, still checkpointed under the ``conv1d.weight`` / ``conv1d.bias`` keys. Our formats
#: (HF adapters, layer reader / writer) use the checkpoint names.
_RENAMED_PARAMS = ((".conv1d_weight", ".conv1d.weight"), (".conv1d_bias", ".conv1d.bias"))


def canonical_name(name: str) -> str:
    """A parameter's name as checkpoints (and our HF adapters) spell it, whatever the module calls it."""
    for module_suffix, checkpoint_suffix in _RENAMED_PARAMS:
        if name.endswith(module_suffix):
            return name[: -len(module_suffix)] + checkpoint_suffix
    return name


def canonical_state_dict(model) -> dict:
    """``model.state_dict()`` under :func:`canonical_name` names, without ``_extra_state`` entries."""
    return {canonical_name(k): v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def load_canonical_state_dict(model, state: dict, strict: bool = True):
    """``model.load_state_dict`` of a state dict under :func:`canonical_name` names."""
    by_canonical = {canonical_name(k): k for k in model.state_dict()}
    return model.load_state_dict({by_canonical.get(k, k): v for k, v in state.items()}, strict=strict)


_MISSING_WHEN_NO_TE = (
    "te_general_gemm", "fused_moe_aux_loss", "fused_permute", "fused_permute_with_probs", "fused_unpermute",
    "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs", "fused_topk_with_score_function",
    "fused_compute_score_for_moe_aux_loss",
)


def bind_missing_te_names() -> list[str]:
    """megatron-core 0.16 without TE: bind the names TE would have provided to None, which selects
    megatron-core's own pure-torch fallbacks (what its ``is None`` checks intend). Returns the names
    bound; none on 0.19, which does this itself. Needed on CPU and on GPUs without TE alike."""
    from megatron.core.transformer.moe import moe_utils

    bound = [name for name in _MISSING_WHEN_NO_TE if not hasattr(moe_utils, name)]
    for name in bound:
        setattr(moe_utils, name, None)
    return bound


def inference_mode():
    """Context for forward passes with an inference context (generation): megatron-core 0.19's
    ``InferenceMode.active()`` (without it, Mamba layers neither read nor advance their cached states),
    a no-op on 0.16."""
    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:
        return contextlib.nullcontext()
    return InferenceMode.active()


def async_save_kwargs() -> dict:
    """``dist_checkpointing.save(..., async_sharded_save=True, **this)``: megatron-core's own async writer
    (the one ``strategies.async_utils.AsyncCallsQueue`` finalizes), named explicitly where 0.19 would
    pick nvidia-resiliency-ext's."""
    import inspect

    from megatron.core import dist_checkpointing

    return {"async_strategy": "mcore"} if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters else {}


def batch_on_this_cp_rank(batch: dict, cp_group) -> dict:
    """megatron-core's ``get_batch_on_this_cp_rank`` (every [b, s, ...] tensor cut to this CP rank's two
    load-balanced chunks), in either release's signature; per-sample entries ([b]) pass through."""
    sequences = {k: v for k, v in batch.items() if torch.is_tensor(v) and v.dim() >= 2}
    return {**batch, **_cp_batch_cutter()(sequences, cp_group=cp_group)}


@functools.cache
def _cp_batch_cutter():
    """``get_batch_on_this_cp_rank`` with the release's extra arguments bound (decided once: it runs
    for every micro-batch)."""
    import inspect

    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return functools.partial(get_batch_on_this_cp_rank, is_hybrid_cp=False)
    return get_batch_on_this_cp_rank
