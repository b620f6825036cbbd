"""Expert-specific learning rates: the rule, and the param groups megatron-core builds from it."""

import json
import math

import pytest

from megatron_ext.errors import ConfigError
from megatron_ext.expert_lr import expert_lr_scale, optimal_lr, rule_scale

WORKER = __file__.replace("test_expert_lr.py", "tiny_training.py")
MOE = {"num_moe_experts": 16, "moe_router_topk": 1}


def test_optimal_lr_peaks_at_the_noise_scale():
    assert optimal_lr(1e6, 1e6, max_lr=3e-4) == pytest.approx(3e-4)
    assert optimal_lr(1e4, 1e6) < optimal_lr(1e5, 1e6) < optimal_lr(1e6, 1e6)
    assert optimal_lr(1e8, 1e6) < optimal_lr(1e6, 1e6)


def test_rule_gives_sqrt_share_for_small_batches():
    # top-1 of 16: a routed expert sees 1/16 of the tokens -> about sqrt(1/16) = 0.25 of the LR
    assert rule_scale(1e3, 1 / 16, 1e12) == pytest.approx(0.25, rel=1e-4)
    # near the noise scale the formula, not the square root, decides
    b, share, noise = 4e6, 1 / 16, 4e6
    expected = (2 / (math.sqrt(noise / (b * share)) + math.sqrt(b * share / noise))) / 1.0
    assert rule_scale(b, share, noise) == pytest.approx(expected)


def test_config_modes():
    assert expert_lr_scale({"mode": "none"}, MOE, 4096) is None
    assert expert_lr_scale({"mode": "manual", "scale": 0.3}, MOE, 4096) == 0.3
    assert expert_lr_scale({"mode": "rule", "noise_scale_tokens": 1e12}, MOE, 4096) == pytest.approx(0.25, rel=1e-3)
    assert expert_lr_scale({"mode": "rule", "noise_scale_tokens": 1e12, "token_share": 0.25}, MOE, 4096) == \
        pytest.approx(0.5, rel=1e-3)
    assert expert_lr_scale({"mode": "manual", "scale": 0.3}, {"num_moe_experts": None}, 4096) is None  # dense
    with pytest.raises(ConfigError, match="train.expert_lr.scale"):
        expert_lr_scale({"mode": "manual"}, MOE, 4096)
    with pytest.raises(ConfigError, match="noise_scale_tokens"):
        expert_lr_scale({"mode": "rule"}, MOE, 4096)
    with pytest.raises(ConfigError, match="mode='fast'"):
        expert_lr_scale({"mode": "fast"}, MOE, 4096)


@pytest.fixture(scope="module")
def run(tmp_path_factory, torchrun_module):
    root = tmp_path_factory.mktemp("expert_lr")
    out = root / "out.json"
    torchrun_module(WORKER, out, root / "ckpt", "expert_lr", "stages.pretrain.train.expert_lr.mode=manual",
                    "stages.pretrain.train.expert_lr.scale=0.25", "stages.pretrain.train.steps=6",
                    "stages.pretrain.train.warmup_steps=2", nproc=1)
    return json.loads(out.read_text())


def _expert_group(groups):
    return [i for i, g in enumerate(groups) if g["names"] and all(".mlp.experts." in n for n in g["names"])]


def test_only_routed_experts_get_the_scaled_group(run):
    groups = run["groups"]
    experts = _expert_group(groups)
    assert len(experts) == 1
    e = groups[experts[0]]
    assert e["max_lr"] == pytest.approx(0.25 * 3e-3) and e["min_lr"] == pytest.approx(0.25 * 3e-4)
    others = [n for i, g in enumerate(groups) if i != experts[0] for n in g["names"]]
    assert any("shared_experts" in n for n in others)
    assert not any(".mlp.experts." in n for n in others)
    for i, g in enumerate(groups):
        if i != experts[0] and g["names"]:
            assert g["max_lr"] == pytest.approx(3e-3) and g["min_lr"] == pytest.approx(3e-4)


def test_expert_lr_is_scaled_at_every_step(run):
    e = _expert_group(run["groups"])[0]
    for step in run["first"] + run["straight"]:
        base = [g["lr"] for i, g in enumerate(step) if i != e]
        assert len(set(base)) == 1
        assert step[e]["lr"] == pytest.approx(0.25 * base[0], rel=1e-12, abs=1e-15)
    # warm-up then cosine (init_lr 0, warmup 2, 6 steps)
    lrs = [s[0]["lr"] for s in run["first"] + run["straight"]]
    expected = [0.0, 1.5e-3, 3e-3] + [3e-4 + 0.5 * (3e-3 - 3e-4) * (1 + math.cos(math.pi * (n - 2) / 4)) for n in (3, 4, 5)]
    assert lrs == pytest.approx(expected)


def test_groups_survive_save_and_load(run):
    before = [(g["max_lr"], g["min_lr"], sorted(g["names"])) for g in run["groups"]]
    after = [(g["max_lr"], g["min_lr"], sorted(g["names"])) for g in run["groups_after_restore"]]
    assert after == before
    assert run["resumed"] == run["straight"]
