"""Test worker (run under torchrun): a tiny hybrid Mamba2/attention/MLP/MoE ``MambaModel`` on the local spec.

    hybrid_training.py <out.json> <ckpt_root> reference         (1 process)
    hybrid_training.py <out.json> <ckpt_root> from_checkpoint   (2 processes, TP2 + sequence parallel)

``reference`` builds the model with the default ``use_mamba_mem_eff_path=True``, saves its initial
weights, records loss and gradients, checks that the ``False`` path gives the same numbers on the same
weights, trains 20 Adam steps on one fixed batch, and checks static-batching generation (prefill +
one-token decode steps) against a full forward. ``from_checkpoint`` loads those weights under TP2
and records the initial loss. Without ``mamba_ssm`` this exercises :mod:`megatron_ext.models.mamba_torch`.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_ext import checkpointing, distributed
from megatron_ext.models import mamba_torch
from megatron_ext.quiet import quiet_known_warnings

VOCAB, SEQ, BATCH, PATTERN = 128, 24, 2, "M*M-E"
MAMBA_PARAMS = ("mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.conv1d.weight", "mixer.conv1d_weight",  # <0.19 | 0.19+
                "mixer.norm.weight",
                "mixer.in_proj.weight", "mixer.out_proj.weight")



def build(tp: int, mem_eff_path: bool, pattern: str = PATTERN):
    from megatron.core.models.mamba import MambaModel
    from megatron.core.transformer import TransformerConfig

    from megatron_ext.models.hybrid_specs import hybrid_stack_spec

    config = TransformerConfig(
        num_layers=len(pattern), hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_query_groups=2, qk_layernorm=True, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        mamba_num_heads=8, mamba_head_dim=16, mamba_state_dim=16, mamba_num_groups=2,
        use_mamba_mem_eff_path=mem_eff_path,
        num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32,
        moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, moe_grouped_gemm=False,
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1, params_dtype=torch.float32,
        use_cpu_initialization=True, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
    )
    return MambaModel(
        config=config, mamba_stack_spec=hybrid_stack_spec(config, mamba_chunk_size=16), vocab_size=VOCAB,
        max_sequence_length=SEQ, hybrid_override_pattern=pattern, position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:], torch.arange(SEQ).expand(BATCH, SEQ)


def lm_loss(model) -> torch.Tensor:
    inputs, labels, positions = fixed_batch()
    return model(inputs, positions, attention_mask=None, labels=labels).float().mean()


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def reference(root: Path) -> dict:
    model = build(tp=1, mem_eff_path=True)
    checkpointing.save(root, 0, model)
    loss = lm_loss(model)
    loss.backward()
    g_eff = grads(model)
    other = build(tp=1, mem_eff_path=False)
    other.load_state_dict(model.state_dict())
    other_loss = lm_loss(other)
    other_loss.backward()
    g_other = grads(other)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    result = {
        "loss": loss.item(),
        "other_path_loss": other_loss.item(),
        "params_without_grad": [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None],
        "n_params": n_params,
        "nonfinite_grads": [n for n, g in g_eff.items() if not torch.isfinite(g).all()],
        "zero_mamba_grads": [n for n, g in g_eff.items() if n.endswith(MAMBA_PARAMS) and not g.abs().sum() > 0],
        "n_mamba_params": sum(n.endswith(MAMBA_PARAMS) for n in g_eff),
        "max_grad_diff_between_paths": max((g_eff[n] - g_other[n]).abs().max().item() for n in g_eff),
        "max_grad": max(g.abs().max().item() for g in g_eff.values()),
    }
    model.zero_grad()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        step_loss = lm_loss(model)
        step_loss.backward()
        opt.step()
        losses.append(step_loss.item())
    result["train_losses"] = losses
    result["max_decode_logit_diff"] = static_decode_vs_full_forward()
    return result


def static_decode_vs_full_forward(prefill: int = 10) -> float:
    """Generation path: prefill (chunked scan's final state) then one-token steps, against one forward.

    The decode steps run megatron-core's own torch recurrence from the state our scan handed over.
    No attention layer here: its KV cache is allocated on ``torch.cuda.current_device()``.
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_ext.mcore_compat import inference_mode

    model = build(tp=1, mem_eff_path=True, pattern="M-M").eval()
    inputs, _, positions = fixed_batch()
    with torch.no_grad():
        full = model(inputs, positions, attention_mask=None)
        ctx = StaticInferenceContext(max_batch_size=BATCH, max_sequence_length=SEQ)
        with inference_mode():   # megatron-core 0.19 keeps Mamba states only in inference mode
            step = model(inputs[:, :prefill], positions[:, :prefill], attention_mask=None, inference_context=ctx,
                         runtime_gather_output=True)
            diffs = [(step[:, -1] - full[:, prefill - 1]).abs().max().item()]
            for t in range(prefill, SEQ):
                ctx.sequence_len_offset = t
                step = model(inputs[:, t : t + 1], positions[:, t : t + 1], attention_mask=None,
                             inference_context=ctx, runtime_gather_output=True)
                diffs.append((step[:, -1] - full[:, t]).abs().max().item())
    return max(diffs)


def from_checkpoint(root: Path) -> dict:
    model = build(tp=2, mem_eff_path=True)
    with torch.no_grad():
        before = lm_loss(model).item()  # a fresh init: shows that loading is what makes the losses agree
    checkpointing.load(checkpointing.iteration_dir(root, 0), model)
    loss = lm_loss(model)
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    return {"loss": loss.item(), "loss_before_load": before, "missing_or_nonfinite_grads": bad}


def main(out: str, ckpt_root: str, mode: str) -> None:
    quiet_known_warnings()
    tp = 2 if mode == "from_checkpoint" else 1
    env = distributed.initialize({"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1,
                                  "expert_model_parallel_size": 1}, seed=1234)
    result = reference(Path(ckpt_root)) if mode == "reference" else from_checkpoint(Path(ckpt_root))
    result["torch_fallback"] = mamba_torch.is_active()
    if env.is_main:
        Path(out).write_text(json.dumps(result))
    distributed.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
