"""What every benchmark records beside its numbers, and the single-rank set-up they share.

A number without the command, the commit and the machine that produced it cannot be compared with a
later one; each script here writes those with its results (``write_result``).
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """HEAD, or ``$TURBOLASER_COMMIT`` where set (the device tool's copy of the tree can lag HEAD)."""
    if os.environ.get("TURBOLASER_COMMIT"):
        return os.environ["TURBOLASER_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cores": os.cpu_count()}


def command(*env_vars: str) -> str:
    """This process's command line, prefixed by the named environment variables' values."""
    prefix = [f"{name}={os.environ.get(name, '')}" for name in env_vars]
    return " ".join([*prefix, Path(sys.executable).name, *sys.argv])


def single_rank_env(port: int | None = None) -> None:
    """The variables ``megatron_ext.distributed.initialize`` reads from torchrun, for one rank started
    in this process (``port=None``: a free one)."""
    if port is None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def write_result(out: str | os.PathLike, result: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


def library_versions() -> dict:
    """The versions of what the numbers depend on (megatron-core, TE, apex, mamba-ssm: None = absent)."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("torch", "megatron-core", "transformer-engine", "apex", "mamba-ssm", "triton"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def gpu_record() -> dict:
    """What a GPU benchmark records first: the command, commit, machine, device and library versions."""
    import torch

    return {"command": command(), "commit": git_commit(), "machine": machine(),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "libraries": library_versions()}


#: Dense bf16 tensor-core peak (no sparsity) from NVIDIA's datasheets, TFLOP/s: what Megatron-LM's and
#: the papers' MFU divide by. Matched against ``torch.cuda.get_device_name()`` in order.
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                         ("H20", 148.0), ("A100", 312.0), ("B200", 2250.0))


def datasheet_bf16_tflops(device_name: str) -> float | None:
    """The datasheet dense bf16 peak of ``device_name``, None for a GPU not in the table."""
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def gpu_kind(device_name: str) -> str:
    """``h100`` for "NVIDIA H100 80GB HBM3", ``h200`` for "NVIDIA H200": the model number when the name
    has one, else its last word."""
    import re

    match = re.search(r"\b([A-Z]+\d{2,4}[A-Za-z]*)\b", device_name.removeprefix("NVIDIA "))
    return (match.group(1) if match else device_name.split()[-1]).lower()


def gpu_result_path(stem: str) -> Path:
    """``benchmarks/results/<stem>_<gpu kind>.json``, e.g. ``attention_kernels_h200.json``."""
    import torch

    return REPO / "benchmarks" / "results" / f"{stem}_{gpu_kind(torch.cuda.get_device_name())}.json"


def cuda_seconds(fn) -> float:
    """Wall time of ``fn()`` with the GPU's queued work finished before and after."""
    import time

    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0
