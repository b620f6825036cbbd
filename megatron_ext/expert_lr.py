"""Expert-specific learning rates (Hunyuan-Large, arXiv 2411.02265, "expert-specific learning rate").

Adam's optimal learning rate grows with the batch size B up to the gradient-noise scale B_noise:

    eps_opt(B) = 2 * eps_max / (sqrt(B_noise / B) + sqrt(B / B_noise))

A specialised (routed) expert sees only ``token_share`` of the tokens the shared expert sees (top-k of
N experts: share = k / N), so its effective batch is ``share * B`` and its learning rate is scaled by
``eps_opt(share * B) / eps_opt(B)`` (about sqrt(share) when B << B_noise: 0.25 for top-1 of 16).
Shared-expert and dense parameters keep the base LR.

The scale enters megatron-core's optimizer as a param-group override of ``max_lr`` / ``min_lr``, so the
routed experts follow the same warm-up and decay curve, scaled. The override also sets ``lr_mult`` to
the scale: megatron-core 0.16.1's scheduler ignores ``lr_mult``, but the distributed optimizer matches
param groups on reload by (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr); without a distinct
``lr_mult`` the expert group collides with the default group and one of them reloads the other's LRs.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from megatron_ext.errors import ConfigError

EXPERT_PARAM_GLOB = "*.mlp.experts.*"  # routed experts only: the shared expert is mlp.shared_experts
MODES = ("none", "rule", "manual")


def optimal_lr(batch_tokens: float, noise_scale_tokens: float, max_lr: float = 1.0) -> float:
    """Adam's optimal LR at batch size ``batch_tokens`` for gradient-noise scale ``noise_scale_tokens``."""
    ratio = noise_scale_tokens / batch_tokens
    return 2.0 * max_lr / (math.sqrt(ratio) + math.sqrt(1.0 / ratio))


def rule_scale(batch_tokens: float, token_share: float, noise_scale_tokens: float) -> float:
    """LR multiplier of a routed expert that sees ``token_share`` of the batch."""
    return optimal_lr(token_share * batch_tokens, noise_scale_tokens) / optimal_lr(batch_tokens, noise_scale_tokens)


def expert_lr_scale(expert_lr: Mapping[str, Any] | None, model: Mapping[str, Any], batch_tokens: int,
                    field: str = "train.expert_lr") -> float | None:
    """The routed experts' LR multiplier from a stage's ``expert_lr`` config; None when not applicable."""
    if not expert_lr or expert_lr.get("mode", "none") == "none" or not model.get("num_moe_experts"):
        return None
    mode = expert_lr["mode"]
    if mode not in MODES:
        raise ConfigError(f"{field}.mode={mode!r}: choose one of {list(MODES)}")
    if mode == "manual":
        scale = expert_lr.get("scale")
        if not isinstance(scale, (int, float)) or not scale > 0:
            raise ConfigError(f"{field}.scale={scale!r}: manual mode needs a positive LR multiplier")
        return float(scale)
    noise = expert_lr.get("noise_scale_tokens")
    if not isinstance(noise, (int, float)) or not noise > 0:
        raise ConfigError(f"{field}.noise_scale_tokens={noise!r}: the rule needs B_noise in tokens (> 0)")
    share = expert_lr.get("token_share") or model.get("moe_router_topk", 2) / model["num_moe_experts"]
    if not 0 < share <= 1:
        raise ConfigError(f"{field}.token_share={share!r}: must be in (0, 1]")
    return rule_scale(batch_tokens, share, noise)


def param_group_overrides(optimizer_config, scale: float | None) -> dict:
    """megatron-core ``config_overrides``: the standard ones (no weight decay on biases and norms) plus
    the routed experts' scaled LR range."""
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey

    overrides = get_standard_config_overrides(optimizer_config)
    if scale is not None and scale != 1.0:
        overrides[ParamKey(name=EXPERT_PARAM_GLOB)] = {
            "max_lr": optimizer_config.lr * scale,
            "min_lr": optimizer_config.min_lr * scale,
            "lr_mult": scale,
        }
    return overrides
