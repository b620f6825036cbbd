"""The RL stage's micro-batch loss (GRPO token loss + K3 KL + LaSeR MSE) against float64 by hand."""

import json
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("rl_loss_worker.py")


@pytest.fixture(scope="module")
def result(tmp_path_factory, torchrun_module):
    out = tmp_path_factory.mktemp("rl_loss") / "result.json"
    torchrun_module(WORKER, out, nproc=1)
    return json.loads(out.read_text())


def test_loss_and_gradient_equal_a_float64_computation(result):
    assert result["loss"] == pytest.approx(result["expected"], rel=1e-5)
    assert result["grad_diff"] <= 1e-5 * result["grad_scale"]
    assert result["lm_loss_tokens"] == result["mask_tokens"]
    assert 0 < result["clip_frac"] < 1  # the clip was active on some tokens and not on others


def test_laser_term_waits_for_its_warm_up(result):
    assert result["early"] == pytest.approx(result["expected_early"], rel=1e-5)
    assert result["early"] != pytest.approx(result["loss"], rel=1e-3)


def test_rows_cut_to_the_rollouts_length_give_the_full_rows_log_probs(result):
    # RolloutBatches.row_length cuts the padding after the longest sequence; causal attention and
    # the MoE layers (dropless) make a position's log-prob independent of what comes after it
    assert result["cut_row_logp_diff"] < 1e-5
