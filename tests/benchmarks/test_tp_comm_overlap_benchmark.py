"""benchmarks/tp_comm_overlap.py runs end to end (CPU, gloo, fp32, tiny features) and records what the
GPU run records: per layer, both paths' errors against megatron-core in fp32 and against each other."""

import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tp_comm_overlap.py"


def test_tiny_cpu_run_records_both_paths_and_they_agree(torchrun, tmp_path):
    out = tmp_path / "tp_comm_overlap.json"
    torchrun(SCRIPT, "--seq", 8, "--batch", 2, "--iters", 0, "--scale", 64, "--out", out, nproc=2)
    result = json.loads(out.read_text())
    assert set(result["layers"]) == {"qkv", "proj", "fc1", "fc2"}
    assert result["dtype"] == "torch.float32" and result["device"] == "cpu"
    for name, layer in result["layers"].items():
        # fp32 on CPU: every path is the reference's arithmetic
        assert layer["overlapped_vs_megatron_core"] == {"out": 0.0, "dx": 0.0, "main_grad": 0.0}, name
        assert layer["overlapped"]["out_err"] == layer["megatron_core"]["out_err"] == 0.0
        assert min(layer["scale"].values()) > 0
