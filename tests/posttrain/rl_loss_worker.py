"""Test worker (torchrun, one process): the RL stage's micro-batch loss against float64 by hand.

    rl_loss_worker.py <out.json>
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from launch.config import load_config
from megatron_ext import distributed
from posttrain.rl_rollouts import RLSettings, rl_loss

SETTINGS = RLSettings(groups=2, group_size=2, epochs=1, max_sampling_rounds=1, clip_eps=0.2, clip_eps_high=0.28,
                      kl_coef=0.05, temperature=0.8, thinking=None, laser=True, laser_alpha=0.1, laser_beta=0.1,
                      laser_coef=0.1, laser_std_threshold=0.1, laser_loss_warmup=0, laser_adv_warmup=0, c_ref=-3.0)


def by_hand(logits, batch, s: RLSettings) -> torch.Tensor:
    """The loss written out per token in float64 (module docstring of posttrain.rl_rollouts)."""
    z = logits.double() / s.temperature
    logp = (z - torch.logsumexp(z, -1, keepdim=True)).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    total = logp.new_zeros(())
    b, t = logp.shape
    for i in range(b):
        a = float(batch["advantages"][i])
        for j in range(t):
            if batch["response_mask"][i, j] == 0:
                continue
            ratio = torch.exp(logp[i, j] - batch["old_logp"][i, j].double())
            clipped = torch.clamp(ratio, 1 - s.clip_eps, 1 + s.clip_eps_high)
            pg = -torch.minimum(ratio * a, clipped * a)
            d = batch["ref_logp"][i, j].double() - logp[i, j]
            kl = torch.clamp(torch.exp(d) - d - 1, 0.0, 10.0)
            total = total + (pg + s.kl_coef * kl) * float(batch["loss_scale"][0])
    for i in range(b):
        if batch["zc_mask"][i].any():
            score = s.laser_beta * ((logp[i] * batch["zc_mask"][i].double()).sum() - float(batch["c_ref"][0]))
            err = float(batch["laser_weight"][i]) * (score - float(batch["rewards"][i])) ** 2
            total = total + s.laser_alpha * err * float(batch["laser_scale"][0])
    return total


def cut_rows_match_full_rows(cfg) -> float:
    """Largest log-prob difference between rows padded to the model's seq_length (128) and the same rows cut to 64
    (RolloutBatches.row_length), on the tiny model through forward_logps: padding after a sequence
    must not change it."""
    from types import SimpleNamespace

    from megatron_ext import model_builder
    from posttrain.rl_rollouts import rl_forward_step_factory
    from posttrain.self_reward_eval import forward_logps

    config = model_builder.transformer_config(cfg.model, cfg.parallel)
    model = model_builder.build_model(cfg.model, config, model_builder.padded_vocab_size(int(cfg.model.vocab_size), 1))
    step = rl_forward_step_factory(SETTINGS, SimpleNamespace(current_step=0, loss_metrics={}))
    g = torch.Generator().manual_seed(1)
    lengths = [64, 37]
    full = torch.zeros(2, 128, dtype=torch.long)   # right-padded with 0
    for i, n in enumerate(lengths):
        full[i, :n] = torch.randint(1, 500, (n,), generator=g)
    rows = {128: full, 64: full[:, :64].clone()}
    out = {}
    for width, tokens in rows.items():
        labels = torch.roll(tokens, -1, dims=1)
        micro = [{"tokens": tokens, "labels": labels, "position_ids": torch.arange(width).expand(2, -1)}]
        out[width] = forward_logps(model, micro, step)[0]
    mask = torch.zeros(2, 63, dtype=torch.bool)   # positions inside each sequence (the last label wraps)
    for i, n in enumerate(lengths):
        mask[i, :n - 1] = True
    return float((out[128][:, :63] - out[64][:, :63]).abs()[mask].max())


def main(out: str) -> None:
    cfg = load_config(["model.moe_routing_mode=dropless", "model.moe_expert_capacity_factor=null"])
    distributed.initialize(cfg.parallel, 0)
    g = torch.Generator().manual_seed(0)
    b, t, v = 3, 7, 13
    logits = torch.randn(b, t, v, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (b, t), generator=g)
    with torch.no_grad():
        z = logits / SETTINGS.temperature
        true_logp = (z - torch.logsumexp(z, -1, keepdim=True)).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    response = torch.tensor([[0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0]], dtype=torch.float)
    zc = torch.tensor([[0, 0, 0, 0, 1, 0, 0], [0] * 7, [0, 0, 0, 1, 0, 0, 0]], dtype=torch.float)
    batch = {
        "labels": labels, "response_mask": response, "zc_mask": zc,
        # old log-probs 0.5 nats off on some tokens, so both clip bounds are active somewhere
        "old_logp": true_logp + 0.5 * torch.randn(b, t, generator=g),
        "ref_logp": true_logp + 0.3 * torch.randn(b, t, generator=g),
        "advantages": torch.tensor([1.2, -0.7, 0.4]), "rewards": torch.tensor([1.0, 0.0, 0.0]),
        "laser_weight": torch.tensor([1.5, 0.0, 0.75]), "c_ref": torch.full((b,), -3.0),
        "loss_scale": torch.full((b,), 2 / 9), "laser_scale": torch.full((b,), 2 / 2),
    }
    sink: dict = {}
    loss, logs = rl_loss(logits, batch, SETTINGS, step=5, sink=sink)
    grad, = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().double().requires_grad_(True)
    expected = by_hand(ref_logits, batch, SETTINGS)
    ref_grad, = torch.autograd.grad(expected, ref_logits)
    # before the LaSeR warm-up ends, the MSE term is absent
    early, _ = rl_loss(logits, batch, replace(SETTINGS, laser_loss_warmup=10), step=5, sink={})
    no_laser = by_hand(ref_logits, {**batch, "zc_mask": torch.zeros_like(zc)}, SETTINGS)
    Path(out).write_text(json.dumps({
        "loss": float(loss), "expected": float(expected), "grad_diff": float((grad.double() - ref_grad).abs().max()),
        "grad_scale": float(ref_grad.abs().max()), "early": float(early), "expected_early": float(no_laser),
        "lm_loss_tokens": float(logs["lm_loss"][1]), "mask_tokens": float(response.sum()),
        "clip_frac": sink["clip_frac"][0], "cut_row_logp_diff": cut_rows_match_full_rows(cfg),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
