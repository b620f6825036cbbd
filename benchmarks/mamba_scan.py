"""Mamba-2 layer on a GPU: eager torch SSD scan vs compiled torch scan vs mamba-ssm's Triton kernels.

    python benchmarks/mamba_scan.py                      # all three, one subprocess each, merged
    python benchmarks/mamba_scan.py --impl compiled      # one of eager | compiled | triton

Shape (the TurboS-style hybrid scaled to hidden 2048; launch/conf/model/hunyuan_turbos.yaml has hidden
5120 with 64 heads x head_dim 64, 16 groups, state 128, chunk 128): hidden 2048, seq 4096, micro-batch
1, 32 Mamba2 heads x head_dim 64 (d_inner 2048, expand 1), 8 groups (4 heads per group as in the
preset), d_state 128, chunk 128, conv width 4. The layer is megatron-core's ``MambaMixer`` built from
:func:`megatron_ext.models.hybrid_specs.hybrid_stack_spec`'s mixer spec, with the default
``use_mamba_mem_eff_path=True``.

Each implementation runs in its own process (the kernels are bound into ``megatron.core.ssm.mamba_mixer``
at import, so one process cannot switch): ``eager`` and ``compiled`` hide ``mamba_ssm`` and set
``$TURBOLASER_MAMBA_SCAN``; ``triton`` imports mamba_ssm's Triton ops (a stub ``selective_scan_cuda``
module, and the package's ``__init__`` skipped: it imports transformers / huggingface_hub / tilelang for
models we do not use). Without ``causal_conv1d`` megatron-core's fused split-conv call goes through
torch's conv + the Triton chunk scan (:func:`megatron_ext.models.mamba_torch.apply`).

Each process feeds the bf16 layer and an fp32 copy of it (same weights, upcast) the same input; the fp32
copy runs the eager torch kernels and is the reference. Records the largest output and input-gradient
error against it, then the median forward + backward time over 20 runs after 5 warm-up runs (the first
call, outside the timing, compiles or autotunes: Triton autotunes for about 100 s). Writes
benchmarks/results/mamba_scan_<device>.json.

On the GPU machine (no internet) the optional pure-Python mamba-ssm wheel (built with
``MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip wheel --no-build-isolation --no-deps
mamba-ssm==2.3.2.post1``; tagged py3-none-any, so it installs on cp312 as is) goes beside the others; it
is kept out of ``.whl/*.whl`` so that other runs stay without it. Omit it to measure the torch paths only.
The whole run (three processes; compile and autotune included) should fit one 600 s device command
(``--budget``); if not, run ``--impl triton`` on its own:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl .whl/optional/mamba_ssm-2.3.2.post1-py3-none-any.whl && export PYTHONPATH=/tmp/site:$PWD \
        && python3 benchmarks/mamba_scan.py && cp benchmarks/results/mamba_scan_*.json $OUT/
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import (  # noqa: E402,E501
    cuda_seconds,
    gpu_record,
    gpu_result_path,
    single_rank_env,
    write_result,
)

IMPLS = ("eager", "compiled", "triton")
DEVICE = "cuda"  # a CPU smoke test of this script's plumbing sets "cpu"


def select_kernels(impl: str) -> None:
    """Make ``megatron.core.ssm.mamba_mixer`` bind ``impl``'s kernels; before anything imports it."""
    assert "megatron.core.ssm.mamba_mixer" not in sys.modules, "select_kernels must run before megatron imports"
    if impl in ("eager", "compiled"):
        sys.modules["mamba_ssm"] = None  # import mamba_ssm -> ImportError: megatron-core falls back to ours
        os.environ["TURBOLASER_MAMBA_SCAN"] = impl
        return
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        raise SystemExit("--impl triton: mamba_ssm is not installed (see this script's docstring)")
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    package = types.ModuleType("mamba_ssm")  # the package without its __init__ (see the module docstring)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = package
    from megatron.core.ssm import mamba_mixer  # its try-import of mamba_ssm runs here

    if not mamba_mixer.HAVE_MAMBA_SSM:
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401  re-raise the real import error

        raise SystemExit("mamba_ssm imported but megatron-core did not bind it")


@contextlib.contextmanager
def torch_reference_kernels():
    """Bind the eager torch kernels into ``mamba_mixer`` for the fp32 reference, whatever ``impl`` is."""
    from megatron.core.ssm import mamba_mixer

    from megatron_ext.models import mamba_torch, ssd_scan_reference
    from megatron_ext.models.gated_rmsnorm import GatedRMSNorm

    names = ("mamba_split_conv1d_scan_combined", "mamba_chunk_scan_combined", "RMSNormGated", "ExtendedRMSNorm")
    saved = {name: getattr(mamba_mixer, name) for name in names}
    for name, value in zip(names, (mamba_torch._split_conv1d_scan, ssd_scan_reference.mamba_chunk_scan_combined,
                                   GatedRMSNorm, mamba_torch.ShardedGatedRMSNorm)):
        setattr(mamba_mixer, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(mamba_mixer, name, value)


def build_mixer(args, bf16: bool):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    from megatron_ext.models.hybrid_specs import hybrid_stack_spec

    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=16, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, mamba_num_heads=args.heads,
        mamba_head_dim=args.head_dim, mamba_num_groups=args.groups, mamba_state_dim=args.d_state,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    spec = hybrid_stack_spec(config, mamba_chunk_size=args.chunk).submodules.mamba_layer.submodules.mixer
    return build_module(spec, config, d_model=args.hidden, layer_number=1,
                        pg_collection=ProcessGroupCollection.use_mpu_process_groups()).cuda()


def run(mixer, x, grad) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out, _ = mixer(x)
    out.backward(grad)
    return out.detach(), x.grad


def timed(mixer, x, grad, iters: int = 20, warmup: int = 5) -> float:
    x = x.detach().clone().requires_grad_()
    times = [cuda_seconds(lambda: mixer(x)[0].backward(grad)) for _ in range(warmup + iters)]
    return statistics.median(times[warmup:])


def measure(impl: str, args) -> dict:
    """One implementation's errors against the fp32 eager reference, and its median fwd+bwd time."""
    select_kernels(impl)
    single_rank_env()
    from megatron_ext import distributed

    distributed.initialize({"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                            "expert_model_parallel_size": 1}, seed=0)
    mixer = build_mixer(args, bf16=True)
    with torch_reference_kernels():
        reference = build_mixer(args, bf16=False)
    reference.load_state_dict({k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                               for k, v in mixer.state_dict().items()})
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (args.seq, args.batch, args.hidden)  # megatron's (sequence, batch, hidden) layout
    x = torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    grad = torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    with torch_reference_kernels():
        ref_out, ref_grad = run(reference, x.float(), grad.float())
    del reference
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    first = cuda_seconds(lambda: run(mixer, x, grad))  # compiles / autotunes
    out, x_grad = run(mixer, x, grad)
    result = {
        "max_abs_err_out": float((out.float() - ref_out).abs().max()),
        "max_abs_err_grad": float((x_grad.float() - ref_grad).abs().max()),
        "max_abs_ref_out": float(ref_out.abs().max()),
        "max_abs_ref_grad": float(ref_grad.abs().max()),
        "first_call_s": first,
        "fwd_bwd_ms": 1000 * timed(mixer, x, grad),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None,
    }
    distributed.destroy()
    return result


def shape_record(args) -> dict:
    return {"hidden": args.hidden, "seq": args.seq, "batch": args.batch, "mamba_heads": args.heads,
            "mamba_head_dim": args.head_dim, "mamba_groups": args.groups, "d_state": args.d_state,
            "chunk": args.chunk, "conv_width": 4, "use_mamba_mem_eff_path": True, "dtype": "bf16"}


def drive(args, out: Path) -> dict:
    """Run each implementation in its own process; the merged record is rewritten after each one, so a
    run stopped by a time limit keeps what finished. ``--budget`` caps the whole run (device commands
    get 600 s): an implementation gets what is left, at most ``--impl-timeout``."""
    start = time.monotonic()
    result = {**gpu_record(), "shape": shape_record(args)}
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("hidden", "seq", "batch", "heads", "head_dim", "groups", "d_state", "chunk")]
    for impl in args.impls.split(","):
        if impl == "triton" and importlib.util.find_spec("mamba_ssm") is None:
            result[impl] = {"skipped": "mamba_ssm is not installed"}
            continue
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "part.json"
            cmd = [sys.executable, __file__, "--impl", impl, f"--out={part}", *forwarded]
            timeout = min(args.impl_timeout, args.budget - (time.monotonic() - start))
            try:
                if timeout < 30:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
                ok = proc.returncode == 0 and part.exists()
                result[impl] = json.loads(part.read_text())[impl] if ok else {
                    "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
            except subprocess.TimeoutExpired:
                result[impl] = {"error": f"not finished within {timeout:.0f} s (--impl-timeout / --budget); "
                                         f"run --impl {impl} on its own"}
        print(impl, result[impl], flush=True)
        write_result(out, result)
    timings = {k: result[k]["fwd_bwd_ms"] for k in IMPLS if "fwd_bwd_ms" in result.get(k, {})}
    if timings:
        result["fastest"] = min(timings, key=timings.get)
        if "eager" in timings:
            result["speedup_vs_eager"] = {k: timings["eager"] / v for k, v in timings.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=(*IMPLS, "all"), default="all")
    parser.add_argument("--impls", default=",".join(IMPLS), help="with --impl all: which, comma-separated")
    parser.add_argument("--impl-timeout", type=int, default=420, help="seconds per implementation process")
    parser.add_argument("--budget", type=int, default=570, help="with --impl all: seconds for the whole run")
    parser.add_argument("--out", default=None, help="result path (default benchmarks/results/mamba_scan_<device>.json)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--d-state", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=128)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/mamba_scan.py measures GPU kernels: no CUDA device is visible here")
    out = Path(args.out) if args.out else gpu_result_path("mamba_scan")
    if args.impl == "all":
        result = drive(args, out)
    else:  # one implementation; merged into an existing result file of the same shape
        result = json.loads(out.read_text()) if out.exists() else {}
        if result.get("shape") != shape_record(args):
            result = {}
        result.update({**gpu_record(), "shape": shape_record(args), args.impl: measure(args.impl, args)})
    write_result(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
