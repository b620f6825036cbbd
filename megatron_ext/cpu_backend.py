"""Run megatron-core (0.16.1 and 0.19.x) on a CPU-only torch (gloo, fp32).

megatron-core assumes CUDA in a handful of places that have nothing to do with the maths. This module
removes those assumptions and nothing else, so every CPU run executes megatron-core's real code paths
(models, DDP, distributed optimizer, schedules, dist_checkpointing). It switches on only when CUDA is
absent (:func:`enable_if_needed`); on GPUs the same program runs untouched.

Patches, each with why:

1. **Module-local ``torch`` proxy** (:data:`_CUDA_HARDCODED_MODULES`). These modules build helper
   tensors with ``device="cuda"`` / ``torch.cuda.current_device()`` (grad buffers, the distributed
   optimizer, grad clipping, schedules' token counts, RoPE, the default causal mask, the MoE aux-loss
   tracker, the rerun state machine) or touch ``torch.cuda.synchronize`` / ``torch.cuda.Stream``. Their
   global name ``torch`` is replaced by a proxy that forwards everything to torch except: factory
   functions map a CUDA device to CPU (and drop ``pin_memory``), and ``torch.cuda`` is a small CPU stand-in (current device
   ``"cpu"``, no-op synchronize/streams, CPU tensor types). torch itself is not modified by this.
2. **``Tensor.type()`` without arguments** reports ``torch.cuda.<X>Tensor`` for CPU tensors: the
   distributed optimizer and ``clip_grads`` accept parameters only by comparing that string.
3. **``Tensor.cuda()``** returns the tensor itself: megatron-core moves small bookkeeping tensors with it.
4. **RNG tracker**: ``model_parallel_cuda_manual_seed`` and the CUDA RNG tracker read and write CUDA
   generator states. :class:`CpuRNGStatesTracker` keeps the same named streams (data-parallel,
   tensor-parallel, expert-parallel) as CPU generator states, forked with ``torch.get/set_rng_state``.
   Activation recomputation (``CheckpointFunction``) saves and restores the CPU state, the tracker's
   states and "the CUDA state"; on CPU the last does not exist, so its get/set become no-ops.
5. **MoE without TE** and **Mamba2 without mamba_ssm**: see :func:`megatron_ext.mcore_compat.bind_missing_te_names` and
   :mod:`megatron_ext.models.mamba_torch` (both applied on GPUs too, when those libraries are absent).

Settings a CPU config must also use (set by :mod:`megatron_ext.model_config`):
``use_cpu_initialization=True``, ``gradient_accumulation_fusion=False``, ``bias_dropout_fusion=False``,
``apply_rope_fusion=False``, ``masked_softmax_fusion=False``, the ``allgather`` MoE dispatcher, and
SequentialMLP experts (no grouped GEMM).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

_ENABLED = False

# Modules whose code hard-codes CUDA devices or CUDA runtime calls (found by running every stage on a
# CPU-only torch; see the module docstring).
_CUDA_HARDCODED_MODULES = (
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.rope_utils",   # context parallelism's RoPE rows
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.ssm.mamba_mixer",
    "megatron.core.ssm.mamba_block",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.shared_experts",
    "megatron.core.rerun_state_machine",
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.random",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.transformer.moe.experts",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)

_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "randperm", "eye", "linspace",
)


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    dev = torch.device(device)
    return torch.device("cpu") if dev.type == "cuda" else dev


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)   # page-locked host memory needs the CUDA driver
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _make_cuda_standin() -> types.SimpleNamespace:
    real = torch.cuda
    ns = types.SimpleNamespace(
        is_available=lambda: False,
        current_device=lambda: "cpu",
        device_count=lambda: 0,
        synchronize=lambda *a, **k: None,
        Stream=_NullStream,
        Event=_NullEvent,
        current_stream=lambda *a, **k: _NullStream(),
        default_stream=lambda *a, **k: _NullStream(),
        stream=lambda s=None: contextlib.nullcontext(),
        set_device=lambda *a, **k: None,
        empty_cache=lambda: None,
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        memory_reserved=lambda *a, **k: 0,
        reset_peak_memory_stats=lambda *a, **k: None,
        manual_seed=lambda seed: None,
        manual_seed_all=lambda seed: None,
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        FloatTensor=torch.FloatTensor,
        HalfTensor=torch.HalfTensor,
        BFloat16Tensor=torch.BFloat16Tensor,
        IntTensor=torch.IntTensor,
        LongTensor=torch.LongTensor,
        ByteTensor=torch.ByteTensor,
        nvtx=types.SimpleNamespace(
            range_push=lambda *a, **k: None,
            range_pop=lambda *a, **k: None,
            range=lambda *a, **k: contextlib.nullcontext(),
        ),
    )
    ns.__getattr__ = lambda name: getattr(real, name)
    return ns


class _CpuTorchProxy(types.ModuleType):
    """``torch`` as seen by a CUDA-hard-coding megatron-core module on a CPU-only machine."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _make_cuda_standin()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):  # only called for names not set above
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """CPU version of megatron-core's ``CudaRNGStatesTracker`` (same named streams, same API).

    Dropout inside tensor-parallel regions must differ between TP ranks and agree across DP ranks;
    megatron-core gets that from named CUDA generator states. Here each name holds a CPU generator
    state, and :meth:`fork` swaps it in and out of torch's default CPU generator.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _install_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs):
        if force_reset or not mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mrandom.initialize_rng_tracker = initialize_rng_tracker
    initialize_rng_tracker(force_reset=True)
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0)
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None


def _tensor_type(orig):
    names = {
        torch.float32: "torch.cuda.FloatTensor",
        torch.float16: "torch.cuda.HalfTensor",
        torch.bfloat16: "torch.cuda.BFloat16Tensor",
    }

    @functools.wraps(orig)
    def type_(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in names:
            return names[self.dtype]
        return orig(self, *args, **kwargs)

    return type_


def is_enabled() -> bool:
    return _ENABLED


def enable_if_needed() -> bool:
    """Apply the CPU patches when CUDA is absent; idempotent. Returns whether the backend is active."""
    global _ENABLED
    from megatron_ext import mcore_compat
    from megatron_ext.models import mamba_torch

    mcore_compat.bind_missing_te_names()
    mamba_torch.apply()  # before the loop below imports mamba_mixer (it needs triton or the stand-in)
    if torch.cuda.is_available() or _ENABLED:
        return _ENABLED
    proxy = _CpuTorchProxy()
    for mod_name in _CUDA_HARDCODED_MODULES:
        mod = importlib.import_module(mod_name)
        assert getattr(mod, "torch", None) is torch or isinstance(mod.torch, _CpuTorchProxy), mod_name
        mod.torch = proxy
    torch.Tensor.type = _tensor_type(torch.Tensor.type)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    _install_rng_tracker()
    _ENABLED = True
    return True
