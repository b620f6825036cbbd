"""Test worker (run under torchrun, 1 process): build a megatron-core MoE layer with each routing mode.

    recycle_routing_worker.py <out.json>

One input and one set of weights per top-k, with a router skewed so most tokens prefer expert 0, so
capacity factor 1.0 overflows it. For each mode it records the final assignment, the routing stats, the
largest difference between the layer's output and a dense per-token reference, the aux loss and whether
gradients are finite; for recycle also whether the same seed gives the same assignment and whether
a restored RNG tracker (as in activation recomputation) does. The test file checks the numbers.
"""

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_ext import distributed
from megatron_ext.quiet import quiet_known_warnings

SEED = 1234
SEQ, BATCH, HIDDEN, EXPERTS, FFN = 5, 5, 32, 4, 32  # 25 tokens: capacity has a little slack
MODES = ("dropless", "drop", "recycle")
CAPACITY_FACTOR = 1.0


def make_config(topk: int, mode: str, **extra):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=EXPERTS,
        moe_router_topk=topk, moe_router_pre_softmax=topk == 1, moe_ffn_hidden_size=FFN,
        moe_shared_expert_intermediate_size=FFN, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, moe_token_dispatcher_type="allgather", use_cpu_initialization=True,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, params_dtype=torch.float32,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2,
        moe_expert_capacity_factor=None if mode == "dropless" else CAPACITY_FACTOR, **extra,
    )


def build_layer(topk: int, mode: str, **extra):
    from megatron_ext.mcore_compat import build_spec

    from megatron_ext.models.recycle_routing import moe_module_spec

    config = make_config(topk, mode, **extra)
    layer = build_spec(moe_module_spec(config, mode), config=config)
    layer.set_layer_number(1)
    return layer


def swiglu(x, fc1, fc2):
    gate, up = fc1.chunk(2, dim=0)  # megatron's linear_fc1 with gated_linear_unit: [gate; up]
    return fc2 @ (F.silu(gate @ x) * (up @ x))


def reference_weights(logits, final_map, original_map, topk, mode):
    """Routing weights written out from the paper / megatron's formulas, independently of the module."""
    if topk == 1:  # pre-softmax top-1: the gate of whichever expert the token ends up with
        weights = torch.softmax(logits, dim=-1)
    else:  # softmax over the logits of the token's experts
        chosen = final_map if mode != "drop" else original_map
        weights = torch.softmax(logits.masked_fill(~chosen, -math.inf), dim=-1)
    return torch.where(final_map, weights, torch.zeros_like(weights))


def dense_reference(layer, x, weights, final_map):
    xs = x.reshape(-1, HIDDEN)
    shared = layer.shared_experts
    out = torch.empty_like(xs)
    for t in range(xs.shape[0]):
        acc = swiglu(xs[t], shared.linear_fc1.weight, shared.linear_fc2.weight)
        for e in final_map[t].nonzero().flatten().tolist():
            expert = layer.experts.local_experts[e]
            acc = acc + weights[t, e] * swiglu(xs[t], expert.linear_fc1.weight, expert.linear_fc2.weight)
        out[t] = acc
    return out.reshape(x.shape)


def run_mode(layer, x, seed):
    """One training forward + backward; returns the router's output, the layer's output, the aux loss."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    captured = {}
    hook = layer.router.register_forward_hook(lambda m, i, o: captured.update(probs=o[0], map=o[1]))
    model_parallel_cuda_manual_seed(seed)
    clear_aux_losses_tracker()
    layer.train()
    layer.zero_grad(set_to_none=True)
    out, _ = layer(x)
    out.square().sum().backward()
    hook.remove()
    aux = float(get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"][0])
    clear_aux_losses_tracker()
    return captured["map"].detach(), out.detach(), aux


def recycle_checks(layer, x) -> dict:
    """Same seed, same assignment; restoring the RNG tracker (what megatron's activation recomputation
    does before re-running a forward) re-draws the same assignment."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def assignment():
        captured = {}
        hook = layer.router.register_forward_hook(lambda m, i, o: captured.update(map=o[1]))
        with torch.no_grad():
            layer.eval()
            layer(x)
        hook.remove()
        return captured["map"]

    layer.eval()
    model_parallel_cuda_manual_seed(7)
    first = assignment()
    saved = get_cuda_rng_tracker().get_states()
    second = assignment()  # the stream has moved on
    get_cuda_rng_tracker().set_states(saved)
    recomputed = assignment()
    model_parallel_cuda_manual_seed(7)
    reseeded = assignment()
    model_parallel_cuda_manual_seed(8)
    other_seed = assignment()
    return {
        "same_seed_same_map": bool(torch.equal(first, reseeded)),
        "other_seed_other_map": not torch.equal(first, other_seed),
        "next_forward_other_map": not torch.equal(first, second),
        "restored_tracker_same_map": bool(torch.equal(second, recomputed)),
    }


def expert_bias_counts(x, router_weight) -> dict:
    """megatron-core's expert bias (aux-loss-free balancing) on: a training forward adds each expert's
    count of the router's original top-2 choice (before capacity in recycle mode) to
    ``local_tokens_per_expert``; a forward without gradients adds nothing."""
    out = {}
    for mode in ("dropless", "recycle"):
        layer = build_layer(2, mode, moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")
        with torch.no_grad():
            layer.router.weight.copy_(router_weight)
        layer.train()
        layer(x)[0].sum().backward()
        after_train = layer.router.local_tokens_per_expert.clone()
        with torch.no_grad():
            layer(x)
        logits = x.reshape(-1, HIDDEN) @ router_weight.T   # sigmoid is monotonic: top-2 of the logits
        original = torch.zeros(logits.shape, dtype=torch.bool).scatter(1, logits.topk(2, dim=1).indices, True)
        out[mode] = {"counted": after_train.tolist(), "expected": original.sum(0).tolist(),
                     "no_grad_unchanged": bool(torch.equal(layer.router.local_tokens_per_expert, after_train))}
    return out


def main(out_path: str) -> None:
    quiet_known_warnings()
    distributed.initialize(
        {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1},
        SEED,
    )
    results = {}
    for topk in (1, 2):
        g = torch.Generator().manual_seed(100 + topk)
        x = torch.randn(SEQ, BATCH, HIDDEN, generator=g) + 1.0
        router_weight = 0.3 * torch.randn(EXPERTS, HIDDEN, generator=g)
        router_weight[0] += 0.15  # expert 0's logit grows with sum(x) ~ HIDDEN: most tokens prefer it
        state = None
        for mode in MODES:
            layer = build_layer(topk, mode)
            if state is None:
                with torch.no_grad():  # O(1) outputs, so 1e-5 is a tight tolerance
                    for param in layer.parameters():
                        param.copy_(0.2 * torch.randn(param.shape, generator=g))
                    layer.router.weight.copy_(router_weight)
                state = {k: v.clone() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
            else:
                layer.load_state_dict(state, strict=False)
            final_map, out, aux = run_mode(layer, x, seed=5)
            logits = x.reshape(-1, HIDDEN) @ layer.router.weight.detach().T
            original_map = torch.zeros_like(final_map).scatter(1, logits.topk(topk, dim=1).indices, True)
            with torch.no_grad():
                weights = reference_weights(logits, final_map, original_map, topk, mode)
                ref = dense_reference(layer, x, weights, final_map)
            stats = layer.router.last_stats
            grads_finite = all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
            entry = {
                "num_tokens": stats.num_tokens,
                "capacity": stats.capacity,
                "dropped": int(stats.dropped),
                "recycled": int(stats.recycled),
                "final_map": final_map.int().tolist(),
                "original_map": original_map.int().tolist(),
                "max_abs_diff": float((out - ref).abs().max()),
                "output": out.reshape(-1, HIDDEN).tolist(),
                "aux_loss": aux,
                "router_grad_finite": bool(grads_finite and layer.router.weight.grad is not None),
            }
            if mode == "recycle":
                entry.update(recycle_checks(layer, x))
            results[f"top{topk}/{mode}"] = entry
        if topk == 2:
            results["expert_bias"] = expert_bias_counts(x, router_weight)
    Path(out_path).write_text(json.dumps(results))
    distributed.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
