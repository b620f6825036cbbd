"""Overlapped sequence-parallel linear layers compute what megatron-core's do (gloo, TP2, fp32).

Whole-model training under ``parallel.tp_comm_overlap=true`` is checked against the single-process
run in tests/megatron_ext/test_parallel_parity.py (layout ``tp2_overlap``); the H200 speed-up is in
benchmarks/README.md.
"""

import json
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "tp_comm_overlap_worker.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory, torchrun_module):
    out = tmp_path_factory.mktemp("tp_overlap") / "out.json"
    torchrun_module(WORKER, out, nproc=2)
    return json.loads(out.read_text())


CASES = [f"{kind}_{variant}" for kind in ("column", "row")
         for variant in ("bias0_fusion0_seq8", "bias1_fusion0_seq8", "bias0_fusion1_seq8", "bias1_fusion1_seq6")]


@pytest.mark.parametrize("case", CASES)
def test_overlapped_layer_matches_megatron_core(results, case):
    got = results[case]
    assert got["overlapped_calls"] == [0, 1]          # megatron-core's layer never, ours once
    tol = 1e-5 * max(1.0, got["scale"])
    for key in ("out", "x_grad", "w_grad", "b_grad"):
        if key in got:
            assert got[key] <= tol, (key, got[key])


def test_without_sequence_parallelism_the_layer_is_megatron_cores(results):
    assert results["no_sp_output_shape"] == [4, 2, 16]   # all-reduced, not reduce-scattered


def test_config_asks_for_sequence_parallelism():
    from megatron_ext.errors import ConfigError
    from megatron_ext.models import tp_comm_overlap

    assert tp_comm_overlap.wanted(None, True) is False    # auto: GPUs only
    assert tp_comm_overlap.wanted(True, True) is True
    assert tp_comm_overlap.wanted(False, True) is False
    with pytest.raises(ConfigError, match="sequence_parallel"):
        tp_comm_overlap.wanted(True, False)
