"""No config reaches a worker that validation should have refused (issue 21): every numeric field of the
pretraining stage, the tiny_large model and the parallel preset (and tiny_turbos' model fields), at 0,
1, a related field's value and one past it, either runs the stage's first step (finite loss) or is
refused with the field named.

Before the checks this test drove were added, 9 of tiny_large's 94 candidates crashed inside
megatron-core or torch (init_lr > lr, Adam betas of 1, log_interval 0, num_query_groups /
cla_share_factor / num_moe_experts / shared-expert size / vocab_size of 0), rotary_base 0 trained on
NaN losses, and 7 of tiny_turbos' crashed (num_layers against the block layout, Mamba2 heads / head
dim / groups / state of 0, heads not divisible by groups).
"""

import json
import math
from pathlib import Path

WORKER = Path(__file__).with_name("boundary_worker.py")


def walk(tmp_path, torchrun, *args) -> list[dict]:
    out = tmp_path / "boundaries.json"
    torchrun(WORKER, out, tmp_path / "scratch", *args, nproc=1, timeout=900)
    return json.loads(out.read_text())


def check(results: list[dict]) -> None:
    crashed = [r for r in results if r["outcome"] == "crashed"]
    assert not crashed, json.dumps(crashed, indent=1)[:4000]
    unnamed = [r for r in results if r["outcome"] == "refused" and r["field"].split(".")[-1] not in r["message"]]
    assert not unnamed, unnamed
    diverged = [r for r in results if r["outcome"] == "ran" and not math.isfinite(r["loss"])]
    assert not diverged, diverged


def test_every_numeric_boundary_runs_or_is_refused_by_name(tmp_path, torchrun):
    results = walk(tmp_path, torchrun)
    check(results)
    fields = {r["field"].split(".")[0] for r in results}
    assert fields == {"stages", "model", "parallel"}
    assert sum(r["outcome"] == "ran" for r in results) >= 40
    assert sum(r["outcome"] == "refused" for r in results) >= 30
    refused = {(r["field"], r["value"]) for r in results if r["outcome"] == "refused"}
    assert ("stages.pretrain.train.warmup_steps", 6) in refused            # = steps: the scheduler's assert
    assert ("parallel.tensor_model_parallel_size", 0) in refused


def test_hybrid_model_boundaries_run_or_are_refused_by_name(tmp_path, torchrun):
    results = walk(tmp_path, torchrun, "tiny_turbos", "model")
    check(results)
    refused = {(r["field"], r["value"]) for r in results if r["outcome"] == "refused"}
    assert ("model.mamba_num_heads", 1) in refused       # not divisible by its 2 groups
    assert ("model.num_layers", 1) in refused            # the block layout makes 12
    assert sum(r["outcome"] == "ran" for r in results) >= 20
