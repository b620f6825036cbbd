"""Test worker (run under torchrun, TP = number of processes): CLA GPT models against references.

    cla_worker.py <out.json>

Writes (rank 0) a JSON of measured differences and counts; test_cla_attention.py asserts on them.
The reference is a plain-torch forward on the gathered full weights that hands the producer's K/V to
the consumer layers explicitly; it is differentiable, so it also checks the gradients.
"""

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ext import distributed
from megatron_ext.mcore_compat import inference_mode
from megatron_ext.quiet import quiet_known_warnings

VOCAB = 128
SEQ = 8
BATCH = 2


def make_config(**overrides):
    from megatron.core.transformer import TransformerConfig

    fields = dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm",
        use_cpu_initialization=True, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, masked_softmax_fusion=False, params_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, qk_layernorm=True,
        tensor_model_parallel_size=dist.get_world_size(), pipeline_dtype=torch.float32,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_gpt(config, block_spec):
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config, transformer_layer_spec=block_spec, vocab_size=VOCAB, max_sequence_length=64,
        pre_process=True, post_process=True, share_embeddings_and_output_weights=False,
        position_embedding_type="rope", rotary_base=10000, parallel_output=False,
    )


def build_cla(config, share, after_rope):
    from megatron_ext.models import hunyuan_moe

    options = hunyuan_moe.HunyuanOptions(cla_share_factor=share, qk_norm_after_rope=after_rope)
    return build_gpt(config, hunyuan_moe.block_spec(config, options))


def build_plain(config):
    """The same layers with megatron-core's own ``SelfAttention`` (the no-CLA reference)."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_ext.models import hunyuan_moe
    from megatron_ext.models.norms import SequenceParallelTorchNorm

    backend = LocalSpecProvider()
    norm = SequenceParallelTorchNorm if config.qk_layernorm else None
    attention = ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                           submodules=SelfAttentionSubmodules(
                               linear_qkv=backend.column_parallel_linear(),
                               core_attention=backend.core_attention(),
                               linear_proj=backend.row_parallel_linear(),
                               q_layernorm=norm, k_layernorm=norm))
    layer = hunyuan_moe.layer_spec(attention, hunyuan_moe.dense_mlp_spec(config))
    return build_gpt(config, TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers,
                                                        layer_norm=SequenceParallelTorchNorm))


def randomise_norms(model, seed=7):
    """Non-uniform norm weights: with all-ones RMSNorm weights the two QK-norm orders coincide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))


def _gather(t, dim):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def full_tensors(model, grads=False):
    """Every parameter (or its gradient) as the full, TP-unsplit tensor, in megatron's global layout."""
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if grads and ("q_layernorm" in name or "k_layernorm" in name):
            t = t.clone()
            dist.all_reduce(t)  # what finalize_model_grads does for QK-norm weights under TP
        if getattr(p, "tensor_model_parallel", False):
            parts = _gather(t, p.partition_dim)
            if "linear_fc1" in name:  # each rank's shard is [gate_r; up_r]
                halves = [part.chunk(2, dim=0) for part in parts]
                t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                t = torch.cat(parts, dim=p.partition_dim)
        out[name] = t.clone()
    return out


def reference_forward(W, tokens, config, share, after_rope):
    """Plain-torch CLA GPT: consumers are handed their producer's K/V explicitly. Returns [b, s, V]."""
    H, nh, ng = config.hidden_size, config.num_attention_heads, config.num_query_groups
    hn, npg, eps = H // nh, nh // ng, config.layernorm_epsilon
    b, s = tokens.shape

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    inv_freq = 1.0 / (10000 ** (torch.arange(0, hn, 2, dtype=torch.float32) / hn))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
    cos, sin = emb.cos(), emb.sin()

    def rope(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    def position_and_norm(t, w):
        return rms(rope(t), w) if after_rope else rope(rms(t, w))

    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    x = W["embedding.word_embeddings.weight"][tokens].transpose(0, 1)  # [s, b, H]
    kv = None
    for layer in range(config.num_layers):
        p = f"decoder.layers.{layer}."
        a = rms(x, W[p + "input_layernorm.weight"])
        if layer % share == 0:
            qkv = (a @ W[p + "self_attention.linear_qkv.weight"].T).view(s, b, ng, (npg + 2) * hn)
            q, k, v = qkv.split([npg * hn, hn, hn], dim=-1)
            q = q.reshape(s, b, nh, hn)
            kv = (position_and_norm(k, W[p + "self_attention.k_layernorm.weight"]), v)
        else:
            q = (a @ W[p + "self_attention.linear_q.weight"].T).view(s, b, nh, hn)
        q = position_and_norm(q, W[p + "self_attention.q_layernorm.weight"])
        k, v = (t.repeat_interleave(npg, dim=2) for t in kv)  # head h reads KV head h // npg
        scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(hn)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        ctx = torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(s, b, nh * hn)
        x = x + ctx @ W[p + "self_attention.linear_proj.weight"].T
        m = rms(x, W[p + "pre_mlp_layernorm.weight"])
        gate, up = (m @ W[p + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ W[p + "mlp.linear_fc2.weight"].T
    x = rms(x, W["decoder.final_layernorm.weight"])
    return (x @ W["output_layer.weight"].T).transpose(0, 1)


def logits_of(model, tokens):
    pos = torch.arange(tokens.size(1)).expand(tokens.size(0), -1)
    return model(tokens, pos, None)


def max_diff(a, b):
    return (a - b).abs().max().item()


def global_numel(model, suffixes):
    """Global parameter count over TP ranks (replicated parameters counted once)."""
    rank0 = dist.get_rank() == 0
    n = sum(p.numel() for name, p in model.named_parameters()
            if name.endswith(suffixes) and (rank0 or getattr(p, "tensor_model_parallel", False)))
    t = torch.tensor([n])
    dist.all_reduce(t)
    return int(t.item())


def check_forward_and_grads(config, result):
    """CLA (x2) logits and gradients vs the explicit-K/V reference, both QK-norm orders."""
    model = build_cla(config, 2, after_rope=True)
    randomise_norms(model)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    weight = torch.randn(BATCH, SEQ, VOCAB, generator=g)

    model.train()
    logits = logits_of(model, tokens)
    (logits * weight).sum().backward()
    W = full_tensors(model)
    grads = full_tensors(model, grads=True)
    Wref = {k: v.clone().requires_grad_(True) for k, v in W.items()}
    ref = reference_forward(Wref, tokens, config, 2, after_rope=True)
    (ref * weight).sum().backward()
    result["logits_vs_reference_after_rope"] = max_diff(logits.detach(), ref.detach())
    result["grads_vs_reference_rel"] = max(
        max_diff(grads[k], Wref[k].grad) / Wref[k].grad.abs().max().clamp_min(1e-6).item() for k in grads)
    result["grad_names_checked"] = len(grads)
    result["cla2_store_entries_after_step"] = len(kv_store_of(model)._kv)   # every group released
    # The consumers' loss reaches the producer's K/V weights only through the hand-off.
    result["logits_scale"] = logits.abs().max().item()

    before = build_cla(config, 2, after_rope=False)
    before.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits_before = logits_of(before, tokens)
        ref_before = reference_forward(W, tokens, config, 2, after_rope=False)
    result["logits_vs_reference_before_rope"] = max_diff(logits_before, ref_before)
    result["after_vs_before_rope_logits"] = max_diff(logits.detach(), logits_before)

    # Full activation recompute in units of one CLA group: same gradients as without recompute.
    rc_config = make_config(recompute_granularity="full", recompute_method="uniform",
                            recompute_num_layers=2)
    rc = build_cla(rc_config, 2, after_rope=True)
    rc.load_state_dict(model.state_dict())
    rc.train()
    rc_logits = logits_of(rc, tokens)
    (rc_logits * weight).sum().backward()
    rc_grads = full_tensors(rc, grads=True)
    result["recompute_logits_diff"] = max_diff(rc_logits.detach(), logits.detach())
    result["recompute_grads_diff"] = max(max_diff(rc_grads[k], grads[k]) for k in grads)

    # Selective recompute of core attention (the consumer's K/V is an input to it).
    sel = build_cla(make_config(recompute_granularity="selective", recompute_modules=["core_attn"]),
                    2, after_rope=True)
    sel.load_state_dict(model.state_dict())
    sel.train()
    (logits_of(sel, tokens) * weight).sum().backward()
    sel_grads = full_tensors(sel, grads=True)
    result["selective_recompute_grads_diff"] = max(max_diff(sel_grads[k], grads[k]) for k in grads)

    # dist_checkpointing sees the consumer's Q projection as a TP-sharded tensor like linear_qkv.
    sharded = model.sharded_state_dict()
    result["sharded_linear_q_keys"] = sorted(k for k in sharded if k.endswith("linear_q.weight"))
    return model


def kv_store_of(model):
    return next(m.kv_store for m in model.modules() if hasattr(m, "kv_store"))


def check_share1_equals_megatron(config, result):
    """cla_share_factor=1, megatron's norm order: same state-dict keys and logits as SelfAttention."""
    plain = build_plain(config)
    randomise_norms(plain)
    cla1 = build_cla(config, 1, after_rope=False)
    missing = cla1.load_state_dict(plain.state_dict(), strict=True)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    plain.eval(), cla1.eval()
    with torch.no_grad():
        result["share1_vs_megatron_logits"] = max_diff(logits_of(cla1, tokens), logits_of(plain, tokens))
    result["share1_state_dict_strict"] = not missing.missing_keys and not missing.unexpected_keys
    cla1.train()
    logits_of(cla1, tokens).sum().backward()
    result["share1_store_entries_after_step"] = len(kv_store_of(cla1)._kv)   # no consumer: nothing held
    return plain


def check_params(config, cla_model, plain_model, result):
    """K/V projection parameters: CLA(x2) has half of the plain GQA model's."""
    H, nh = config.hidden_size, config.num_attention_heads
    q_params = config.num_layers * nh * (H // nh) * H
    cla_in = global_numel(cla_model, ("linear_qkv.weight", "linear_q.weight"))
    plain_in = global_numel(plain_model, ("linear_qkv.weight",))
    result["kv_proj_params_cla"] = cla_in - q_params
    result["kv_proj_params_plain"] = plain_in - q_params
    result["q_proj_params"] = q_params
    result["total_params_cla"] = global_numel(cla_model, ("",))
    result["total_params_plain"] = global_numel(plain_model, ("",))


def cache_bytes_per_token(ctx):
    n = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
            for k, v in ctx.key_value_memory_dict.values())
    t = torch.tensor([n // (ctx.max_sequence_length * ctx.max_batch_size)])
    dist.all_reduce(t)  # KV heads are split over TP ranks
    return int(t.item()), len(ctx.key_value_memory_dict)


def check_generation(model, plain, result):
    """KV cache: greedy tokens and per-step logits equal a full recompute; one cache entry per group."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_ext.models.cla_attention import cla_generate_greedy

    prompt = torch.randint(0, VOCAB, (BATCH, 5), generator=torch.Generator().manual_seed(3))
    cached = cla_generate_greedy(model, prompt, 6, use_cache=True)
    uncached = cla_generate_greedy(model, prompt, 6, use_cache=False)
    result["generate_cached"] = cached.tolist()
    result["generate_uncached"] = uncached.tolist()
    plain_cached = cla_generate_greedy(plain, prompt, 6, use_cache=True)
    plain_uncached = cla_generate_greedy(plain, prompt, 6, use_cache=False)
    result["plain_generate_equal"] = plain_cached.tolist() == plain_uncached.tolist()

    # Prefill 3 tokens, then a 3-token chunk (offset causal mask), then 1-token steps.
    seq = uncached
    ctx = StaticInferenceContext(BATCH, seq.size(1))
    with torch.no_grad():
        full = model(seq, torch.arange(seq.size(1)).expand(BATCH, -1), None)  # [b, s, V]
        diffs, start = [], 0
        for chunk in (3, 3, 1, 1, 1):
            inp = seq[:, start:start + chunk]
            pos = torch.arange(start, start + chunk).expand(BATCH, -1)
            with inference_mode():
                step = model(inp, pos, None, inference_context=ctx, runtime_gather_output=True)
            diffs.append(max_diff(step[:, -1], full[:, start + chunk - 1]))
            ctx.sequence_len_offset += chunk
            start += chunk
    result["cached_step_logits_diff"] = max(diffs)
    result["cla_cache_bytes_per_token"], result["cla_cache_entries"] = cache_bytes_per_token(ctx)

    ctx_plain = StaticInferenceContext(BATCH, 8)
    with torch.no_grad():
        with inference_mode():
            plain(prompt, torch.arange(5).expand(BATCH, -1), None, inference_context=ctx_plain,
                  runtime_gather_output=True)
    result["plain_cache_bytes_per_token"], result["plain_cache_entries"] = cache_bytes_per_token(ctx_plain)


def check_rope_norm_formula(config, result):
    """apply_rope_and_qk_norm against the formulas: after RoPE = rms(rope(x)), before = rope(rms(x))."""
    from megatron.core import parallel_state

    from megatron_ext.models.cla_attention import apply_rope_and_qk_norm

    g = torch.Generator().manual_seed(4)
    s, hn = 5, 16
    q = torch.randn(s, 1, 2, hn, generator=g)
    k = torch.randn(s, 1, 1, hn, generator=g)
    qn, kn = torch.nn.RMSNorm(hn, eps=1e-5), torch.nn.RMSNorm(hn, eps=1e-5)
    with torch.no_grad():
        qn.weight.copy_(torch.rand(hn, generator=g) + 0.5)
        kn.weight.copy_(torch.rand(hn, generator=g) + 0.5)
    theta = torch.outer(torch.arange(s, dtype=torch.float32),
                        1.0 / (10000 ** (torch.arange(0, hn, 2, dtype=torch.float32) / hn)))
    emb = torch.cat([theta, theta], -1)[:, None, None, :]

    def rope(t):
        t1, t2 = t.chunk(2, -1)
        return t * emb.cos() + torch.cat([-t2, t1], -1) * emb.sin()

    def rms(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    cp = parallel_state.get_context_parallel_group()
    with torch.no_grad():
        qa, ka = apply_rope_and_qk_norm(q, k, emb, emb, qn, kn, config, True, cp_group=cp)
        qb, kb = apply_rope_and_qk_norm(q, k, emb, emb, qn, kn, config, False, cp_group=cp)
        result["after_rope_formula_diff"] = max(max_diff(qa, rms(rope(q), qn.weight)),
                                                max_diff(ka, rms(rope(k), kn.weight)))
        result["before_rope_formula_diff"] = max(max_diff(qb, rope(rms(q, qn.weight))),
                                                 max_diff(kb, rope(rms(k, kn.weight))))
        result["after_vs_before_rope_q"] = max_diff(qa, qb)
        # With a uniform norm weight RoPE commutes with RMSNorm (a rotation keeps the RMS).
        qn.weight.fill_(1.7)
        qa1, _ = apply_rope_and_qk_norm(q, None, emb, None, qn, None, config, True, cp_group=cp)
        qb1, _ = apply_rope_and_qk_norm(q, None, emb, None, qn, None, config, False, cp_group=cp)
        result["uniform_weight_orders_diff"] = max_diff(qa1, qb1)


def check_straddle_at_build(config, result):
    """A consumer whose producer is not in its model chunk refuses to build (ConfigError)."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_ext.errors import ConfigError
    from megatron_ext.models.cla_attention import CLAKVStore, cla_attention_specs

    consumer = cla_attention_specs(config, 2)[1]
    consumer.params = {**consumer.params, "kv_store": CLAKVStore(2)}  # no producer registered
    try:
        build_module(consumer, config=config, layer_number=2)
        result["straddle_build_error"] = None
    except ConfigError as err:
        result["straddle_build_error"] = str(err)


def check_moe_smoke(result):
    """The MoE spec path builds and runs (shared expert settings are left to the Hunyuan config)."""
    config = make_config(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="allgather",
                         moe_grouped_gemm=False, moe_router_load_balancing_type="none",
                         moe_ffn_hidden_size=64)
    model = build_cla(config, 2, after_rope=True)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = logits_of(model.eval(), tokens)
    result["moe_logits_finite"] = bool(torch.isfinite(out).all())
    result["moe_has_linear_q"] = sum(1 for n, _ in model.named_parameters() if n.endswith("linear_q.weight"))


def main(out: str) -> None:
    quiet_known_warnings()
    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    distributed.initialize({"tensor_model_parallel_size": world, "pipeline_model_parallel_size": 1,
                            "expert_model_parallel_size": 1}, seed=1234)
    config = make_config()
    result = {"tp": world}
    cla_model = check_forward_and_grads(config, result)
    plain = check_share1_equals_megatron(config, result)
    check_params(config, cla_model, plain, result)
    check_generation(cla_model, plain, result)
    check_rope_norm_formula(config, result)
    check_straddle_at_build(config, result)
    check_moe_smoke(result)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    distributed.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
