"""benchmarks/rl_generation_hf.py end to end in its tiny CPU mode: save, export, load in transformers,
both generates, and the record it writes. In fp32 the two must compute the same model: equal prefill
logits (to rounding) and the same greedy tokens."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_tiny_cpu_run_records_both_sides_and_they_agree(tmp_path):
    out = tmp_path / "rl_generation_hf.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "rl_generation_hf.py"), "--tiny", "--device", "cpu",
           "--out", str(out), "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["model"]["dtype"] == "float32"
    assert result["prefill_logits"]["max_abs_diff"] < 1e-4
    assert result["prefill_logits"]["argmax_agreement"] == 1.0
    assert [r["batch_size"] for r in result["results"]] == [1, 2]
    for row in result["results"]:
        assert row["ours_cuda_graphs"] is False               # CPU: no graph
        for side in ("ours", "ours_eager", "transformers"):
            assert row[side]["tokens_per_s"] > 0 and len(row[side]["seconds"]) == result["settings"]["repeats"]
        assert row["speedup"] == row["ours"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
        for key in ("greedy_agreement", "greedy_agreement_ours_eager"):
            assert row[key] == {"first16": 1.0, "all": 1.0, "mean_first_difference": result["settings"]["new_tokens"]}
    assert '"summary": "rl_generation_hf tiny cpu' in proc.stdout
