"""Routing modes of megatron_ext.models.recycle_routing (Hunyuan-Large recycle routing, arXiv 2411.02265).

The layer tests run one torchrun worker (1 gloo process: megatron-core's MoE layer needs parallel state)
that builds a skewed-router MoE layer per top-k and mode; the pure-tensor tests run in-process.
"""

import json
import math

import pytest
import torch

from megatron_ext.errors import ConfigError

WORKER = __file__.replace("test_recycle_routing.py", "recycle_routing_worker.py")
TOKENS, EXPERTS, CAPACITY_FACTOR = 25, 4, 1.0


@pytest.fixture(scope="module")
def results(tmp_path_factory, torchrun_module):
    out = tmp_path_factory.mktemp("recycle_routing") / "results.json"
    torchrun_module(WORKER, out, nproc=1)
    return json.loads(out.read_text())


def _maps(entry):
    return torch.tensor(entry["final_map"], dtype=torch.bool), torch.tensor(entry["original_map"], dtype=torch.bool)


def _capacity(topk):
    return math.ceil(CAPACITY_FACTOR * TOKENS * topk / EXPERTS)


@pytest.mark.parametrize("topk", [1, 2])
def test_dropless_routes_every_token_to_its_top_choice(results, topk):
    entry = results[f"top{topk}/dropless"]
    final, original = _maps(entry)
    assert torch.equal(final, original)
    assert final.sum(dim=0).max() > _capacity(topk)  # the router is skewed: capacity would bite
    assert entry["dropped"] == entry["recycled"] == 0 and entry["capacity"] is None


@pytest.mark.parametrize("topk", [1, 2])
def test_drop_mode_drops_over_capacity_assignments(results, topk):
    entry = results[f"top{topk}/drop"]
    final, original = _maps(entry)
    assert entry["capacity"] == _capacity(topk)
    assert (final.sum(dim=0) <= entry["capacity"]).all()
    assert not (final & ~original).any()  # only drops, never moves
    assert entry["dropped"] == TOKENS * topk - int(final.sum()) > 0
    assert entry["recycled"] == 0


@pytest.mark.parametrize("topk", [1, 2])
def test_recycle_mode_places_every_assignment_within_capacity(results, topk):
    entry, dropped = results[f"top{topk}/recycle"], results[f"top{topk}/drop"]
    final, original = _maps(entry)
    kept_by_drop, _ = _maps(dropped)
    assert (final.sum(dim=1) == topk).all()  # topk distinct experts per token (a bool map)
    assert (final.sum(dim=0) <= entry["capacity"]).all()
    assert entry["dropped"] == 0
    assert entry["recycled"] == dropped["dropped"] == int((final & ~original).sum())
    assert not (kept_by_drop & ~final).any()  # what drop mode keeps, recycle keeps too


@pytest.mark.parametrize("mode", ["dropless", "drop", "recycle"])
@pytest.mark.parametrize("topk", [1, 2])
def test_output_matches_dense_per_token_reference(results, topk, mode):
    assert results[f"top{topk}/{mode}"]["max_abs_diff"] < 1e-5
    assert results[f"top{topk}/{mode}"]["router_grad_finite"]


@pytest.mark.parametrize("topk", [1, 2])
def test_modes_differ_but_share_the_aux_loss(results, topk):
    outputs = {m: torch.tensor(results[f"top{topk}/{m}"]["output"]) for m in ("drop", "recycle")}
    assert (outputs["drop"] - outputs["recycle"]).abs().max() > 1e-2  # so the reference check has teeth
    aux = {results[f"top{topk}/{m}"]["aux_loss"] for m in ("dropless", "drop", "recycle")}
    assert len(aux) == 1  # computed on the router's original probabilities in every mode


@pytest.mark.parametrize("topk", [1, 2])
def test_recycle_assignment_is_reproducible(results, topk):
    entry = results[f"top{topk}/recycle"]
    assert entry["same_seed_same_map"]
    assert entry["restored_tracker_same_map"]  # what activation recomputation relies on
    assert entry["other_seed_other_map"] and entry["next_forward_other_map"]


# ---- pure-tensor checks (no process group) ----

def _skewed(num_tokens, num_experts, topk, capacity, seed):
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    logits[:, 0] += 3.0
    top = logits.topk(topk, dim=1).indices
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
    probs = torch.softmax(logits, dim=-1) * routing_map
    factor = capacity * num_experts / (num_tokens * topk)
    _, kept = apply_router_token_dropping(probs, routing_map, router_topk=topk, capacity_factor=factor)
    return routing_map, kept, torch.rand(num_tokens, num_experts + 1, generator=g)


@pytest.mark.parametrize("seed", range(5))
def test_recycle_assignments_top1_places_everything(seed):
    from megatron_ext.models.recycle_routing import recycle_assignments

    routing_map, kept, noise = _skewed(64, 8, 1, capacity=8, seed=seed)
    final, left_over = recycle_assignments(routing_map, kept, 8, noise)
    assert int(left_over) == 0
    assert (final.sum(dim=1) == 1).all() and (final.sum(dim=0) <= 8).all()
    assert not (kept & ~final).any()


def test_recycle_assignments_counts_what_cannot_be_placed():
    from megatron_ext.models.recycle_routing import recycle_assignments

    # top-2, capacity 2: experts 0 and 1 are full; token 2 lost expert 0 and already holds expert 2,
    # the only one with room.
    routing_map = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    kept = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    noise = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    final, left_over = recycle_assignments(routing_map, kept, 2, noise)
    assert torch.equal(final, kept) and int(left_over) == 1


def test_recycle_assignments_depend_only_on_the_noise():
    from megatron_ext.models.recycle_routing import recycle_assignments

    routing_map, kept, noise = _skewed(32, 4, 2, capacity=17, seed=3)
    a, _ = recycle_assignments(routing_map, kept, 17, noise)
    b, _ = recycle_assignments(routing_map, kept, 17, noise.clone())
    other_noise = torch.rand(noise.shape, generator=torch.Generator().manual_seed(9))
    c, _ = recycle_assignments(routing_map, kept, 17, other_noise)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "mode, capacity_factor, pad, field",
    [
        ("recylce", None, False, "moe_routing_mode"),
        ("dropless", 1.0, False, "moe_expert_capacity_factor"),
        ("recycle", None, False, "moe_expert_capacity_factor"),
        ("drop", 1.0, True, "moe_pad_expert_input_to_capacity"),
    ],
)
def test_config_errors_name_the_field(mode, capacity_factor, pad, field):
    from types import SimpleNamespace

    from megatron_ext.models.recycle_routing import check_routing_config

    config = SimpleNamespace(moe_expert_capacity_factor=capacity_factor, moe_pad_expert_input_to_capacity=pad)
    with pytest.raises(ConfigError, match=field):
        check_routing_config(config, mode)


@pytest.mark.parametrize("mode", ["dropless", "recycle"])
def test_expert_bias_counts_the_original_choice_in_training_forwards_only(results, mode):
    got = results["expert_bias"][mode]
    assert got["counted"] == got["expected"] and sum(got["expected"]) == 2 * 25
    assert got["no_grad_unchanged"]
