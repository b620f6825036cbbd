"""Peak memory of a Hugging Face export (and of importing it back) against the checkpoint's size.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/hf_export_memory.py [--hidden 512 --layers 8 --experts 16]

Saves a randomly initialised Hunyuan MoE model (tiny_large's features without CLA, scaled up by the
flags) as a checkpoint, then exports it in a fresh process and reads that process's peak resident
memory. The baseline is a process that only imports torch, megatron-core and the exporter and starts
the process group (what every export pays before reading a tensor); the export's own cost is the
difference, compared with the checkpoint's size, the largest layer and the shard size. Streaming
export and import should cost about one shard plus one layer, not the model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.run_record import REPO, command, git_commit, machine, write_result  # noqa: E402

SAVE = """
import sys
from pathlib import Path
import torch
from omegaconf import OmegaConf
from launch.config import load_config
from megatron_ext.quiet import quiet_known_warnings
quiet_known_warnings()
from megatron_ext import checkpointing
from megatron_ext.hf.checkpoint_layers import build_single, single_process
cfg = load_config(sys.argv[2:]).model
with single_process():
    model = build_single(cfg, 512, device="cpu")
    checkpointing.save(Path(sys.argv[1]).parent, 0, model)
    layer = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith("decoder.layers.0."))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
OmegaConf.save(cfg, Path(sys.argv[1]).parent / "model.yaml", resolve=True)
print(layer, total)
"""

BASELINE = """
from megatron_ext.quiet import quiet_known_warnings
quiet_known_warnings()
from megatron_ext.hf import convert
from megatron_ext.hf.checkpoint_layers import single_process
with single_process():
    pass
"""


# a fresh parent per measurement: getrusage(RUSAGE_CHILDREN) reports the largest child it ever waited for
MEASURE = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)
"""


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """Peak resident memory (MiB) and wall time of a command, run in a process of its own."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=REPO, capture_output=True, text=True)
    peak_kib, rc = map(int, proc.stdout.split()[-2:])
    if rc != 0:
        raise SystemExit(proc.stderr[-3000:])
    return peak_kib / 1024, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--shard", default="50MB")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "hf_export_memory.json"))
    args = parser.parse_args()
    h = args.hidden
    overrides = ["model=tiny_large", "model.cla_share_factor=1", f"model.hidden_size={h}",
                 f"model.num_layers={args.layers}", f"model.num_moe_experts={args.experts}",
                 f"model.ffn_hidden_size={2 * h}", f"model.moe_ffn_hidden_size={2 * h}",
                 f"model.moe_shared_expert_intermediate_size={2 * h}", "model.num_attention_heads=8",
                 "model.num_query_groups=4", "model.moe_router_topk=2", "model.moe_routing_mode=dropless",
                 "model.moe_expert_capacity_factor=null"]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt" / "iter_0000000"
        saved = subprocess.run([sys.executable, "-c", SAVE, str(ckpt), *overrides], cwd=REPO,
                               capture_output=True, text=True)
        if saved.returncode != 0:
            raise SystemExit(saved.stderr[-3000:])
        layer_bytes, model_bytes = map(int, saved.stdout.split()[-2:])
        ckpt_bytes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        export_mb, export_s = peak_rss_mb([sys.executable, "-m", "megatron_ext.hf.convert", "export", str(ckpt),
                                           str(Path(tmp) / "hf"), "--model-config", str(ckpt.parent / "model.yaml"),
                                           "--max-shard-size", args.shard])
        import_mb, import_s = peak_rss_mb([sys.executable, "-m", "megatron_ext.hf.convert", "import",
                                           str(Path(tmp) / "hf"), str(Path(tmp) / "imported")])
    base_mb, _ = peak_rss_mb([sys.executable, "-c", BASELINE])
    mb = 1e6 / 2**20   # decimal MB (shard sizes) in MiB
    result = {
        "command": command("OMP_NUM_THREADS"), "commit": git_commit(), "machine": machine(),
        "model": {"hidden": h, "layers": args.layers, "experts": args.experts, "model_mib": model_bytes / 2**20,
                  "largest_layer_mib": layer_bytes / 2**20},
        "checkpoint_mib": ckpt_bytes / 2**20, "shard_limit": args.shard,
        "peak_rss_mib": {"export": export_mb, "baseline_process": base_mb},
        "export_cost_mib": export_mb - base_mb,
        "export_cost_over_checkpoint": (export_mb - base_mb) / (ckpt_bytes / 2**20),
        "shard_plus_layer_mib": float(args.shard.rstrip("MB")) * mb + layer_bytes / 2**20,
        "export_s": export_s,
        "import": {"peak_rss_mib": import_mb, "cost_mib": import_mb - base_mb,
                   "cost_over_checkpoint": (import_mb - base_mb) / (ckpt_bytes / 2**20), "seconds": import_s},
    }
    write_result(args.out, result)
    print(f"checkpoint {result['checkpoint_mib']:.0f} MiB, largest layer {layer_bytes / 2**20:.0f} MiB, shard "
          f"limit {args.shard}: export peak {export_mb:.0f} MiB - baseline {base_mb:.0f} MiB = "
          f"{result['export_cost_mib']:.0f} MiB ({100 * result['export_cost_over_checkpoint']:.0f}% of the "
          f"checkpoint; shard + layer = {result['shard_plus_layer_mib']:.0f} MiB), {export_s:.1f} s; import of "
          f"that folder: {import_mb - base_mb:.0f} MiB above the baseline, {import_s:.1f} s")


if __name__ == "__main__":
    main()
