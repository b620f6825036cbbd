"""benchmarks/demo_wall_time.py on a two-stage pipeline of a few steps: the record it writes."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_records_the_total_and_each_stage(tmp_path):
    out = tmp_path / "demo_wall_time.json"
    overrides = ["pipeline.order=[pretrain,anneal]", *(f"stages.{s}.train.{k}={v}" for s in ("pretrain", "anneal")
                 for k, v in (("steps", 2), ("eval_interval", 2), ("save_interval", 2), ("eval_iters", 1),
                              ("warmup_steps", 1)))]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "demo_wall_time.py"), "--out", str(out),
                           *overrides], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["stages_s"]) == ["01_pretrain", "02_anneal"]
    assert all(t > 0 for t in result["stages_s"].values())
    assert result["between_stages_s"] > 0
    assert abs(result["total_s"] - sum(result["stages_s"].values()) - result["between_stages_s"]) < 0.2
    assert result["summary"][0].split()[:2] == ["stage", "steps"]
    assert result["libraries"]["megatron-core"] and result["commit"]
