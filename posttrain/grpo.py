"""The pure-torch math of GRPO as Hunyuan-TurboS's two-stage RL uses it (arXiv 2505.15431, RL section).

GRPO (DeepSeekMath, arXiv 2402.03300, Sec. 4.1) samples a group of G responses per prompt and replaces
the critic by the group's statistics: response i of a group gets the advantage
``A_i = (r_i - mean(r)) / std(r)`` on every one of its tokens. TurboS trains with the *token-level*
loss (DAPO, arXiv 2503.14476, Eq. 8: every response token of the batch weighs the same, so long
responses are not down-weighted), a K3 KL penalty clipped to [0, 10], prompt filtering (drop prompts
the policy always passes or always fails) and DAPO's dynamic sampling (drop groups whose advantages
are all zero: they carry no gradient but still dilute the token mean).

Conventions: a batch is ``b`` responses; ``group_ids`` ``[b]`` (any integers) names each response's
prompt group; per-token tensors are ``[b, t]`` with a ``response_mask`` that is 1 on the response's
tokens. Everything is computed in at least float32 (float64 inputs stay float64).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half / bfloat16 / integer inputs, float64 kept: the RL math needs the precision."""
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def group_mean_std(values: torch.Tensor, group_ids: torch.Tensor, mask: torch.Tensor | None = None):
    """Per-response ``(mean, std, count)`` of ``values`` over its group's members where ``mask``.

    ``std`` is the *sample* (Bessel-corrected, ``n - 1``) standard deviation, as ``torch.std`` and
    the common GRPO implementations compute it; a group with fewer than two counted members has std
    0. Members outside ``mask`` still receive their group's statistics but do not contribute.
    The statistics are detached (they feed advantages, constants of the loss).
    """
    assert values.dim() == 1 and values.shape == group_ids.shape, (values.shape, group_ids.shape)
    v = values.detach().to(_compute_dtype(values))
    w = torch.ones_like(v) if mask is None else mask.to(v.dtype)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = v.new_zeros(num_groups).index_add_(0, inverse, w)
    mean = v.new_zeros(num_groups).index_add_(0, inverse, v * w) / count.clamp(min=1)
    sq_dev = ((v - mean[inverse]) * w) ** 2
    var = v.new_zeros(num_groups).index_add_(0, inverse, sq_dev) / (count - 1).clamp(min=1)
    return mean[inverse], var.sqrt()[inverse], count[inverse]


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
                     normalize_std: bool = True) -> torch.Tensor:
    """GRPO outcome advantage ``A_i = (r_i - mean_g) / (std_g + eps)`` (DeepSeekMath Sec. 4.1.2).

    ``std_g`` is the sample std of the group (:func:`group_mean_std`); ``eps`` keeps an all-equal
    group (std 0) at advantage 0 instead of 0/0. ``normalize_std=False`` gives ``r_i - mean_g``
    (Dr. GRPO, arXiv 2503.20783, which argues the std division over-weights easy/hard prompts).
    The result is detached: advantages are constants of the policy-gradient loss.
    """
    mean, std, _ = group_mean_std(rewards, group_ids)
    centred = rewards.detach().to(mean.dtype) - mean
    return centred / (std + eps) if normalize_std else centred


class PromptFilter(NamedTuple):
    """Prompt filtering's verdict, per response (each response carries its group's verdict)."""

    all_pass: torch.Tensor  # [b] bool: every response of the group passed
    all_fail: torch.Tensor  # [b] bool: every response of the group failed
    keep: torch.Tensor  # [b] bool: neither (the group still teaches something)


def prompt_filter(rewards: torch.Tensor, group_ids: torch.Tensor, pass_reward: float = 1.0,
                  fail_reward: float = 0.0) -> PromptFilter:
    """Which groups are all-pass (every ``r >= pass_reward``) or all-fail (every ``r <= fail_reward``).

    TurboS's prompt filtering drops prompts the current policy always solves or never solves: their
    groups have zero GRPO advantage, so they only cost rollout time. Used offline (on a pass rate
    measured with the starting policy) or online on each step's groups.
    """
    assert rewards.shape == group_ids.shape and rewards.dim() == 1, (rewards.shape, group_ids.shape)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0

    def all_in_group(flags: torch.Tensor) -> torch.Tensor:
        misses = torch.zeros(num_groups, dtype=torch.long, device=flags.device)
        misses.index_add_(0, inverse, (~flags).long())
        return (misses == 0)[inverse]

    all_pass = all_in_group(rewards >= pass_reward)
    all_fail = all_in_group(rewards <= fail_reward)
    return PromptFilter(all_pass=all_pass, all_fail=all_fail, keep=~(all_pass | all_fail))


def zero_advantage_groups(advantages: torch.Tensor, group_ids: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """``[b]`` bool, True for responses whose whole group has ``|A| <= atol`` (DAPO Sec. 3.2).

    Such groups give no policy gradient (every token's term is zero) but, with a token-level mean,
    still enlarge the denominator and so shrink the update: DAPO's dynamic sampling drops them (and
    samples more prompts until the batch is full).
    """
    assert advantages.shape == group_ids.shape and advantages.dim() == 1
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    nonzero = torch.zeros(num_groups, dtype=torch.long, device=advantages.device)
    nonzero.index_add_(0, inverse, (advantages.detach().abs() > atol).long())
    return (nonzero == 0)[inverse]


def dynamic_sampling_mask(advantages: torch.Tensor, group_ids: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """``[b]`` bool keep-mask of DAPO's dynamic sampling: the complement of :func:`zero_advantage_groups`."""
    return ~zero_advantage_groups(advantages, group_ids, atol)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor,
          clip: tuple[float, float] | None = (0.0, 10.0)) -> torch.Tensor:
    """Per-token K3 estimator of KL(pi_theta || pi_ref): ``exp(d) - d - 1`` with ``d = ref_logp - logp``.

    Schulman's "Approximating KL divergence" (2020) k3: unbiased for samples from pi_theta and never
    negative (``e^d >= 1 + d``), as used by GRPO (DeepSeekMath Eq. 4). TurboS clips it to [0, 10]:
    a token the reference finds far less likely gives ``e^d`` huge, and one such token would dominate
    the loss (the clamp also zeroes its gradient). The lower bound 0 only removes rounding below zero.
    ``clip=None`` leaves it unclipped.
    """
    d = ref_logp.to(_compute_dtype(ref_logp)) - logp.to(_compute_dtype(logp))
    kl = torch.exp(d) - d - 1
    return kl if clip is None else kl.clamp(min=clip[0], max=clip[1])


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                kl_coef: float = 0.0, ref_logp: torch.Tensor | None = None):
    """Token-level clipped GRPO loss and its metrics.

    Per token (DAPO Eq. 8, GRPO's KL term of DeepSeekMath Eq. 3):
    ``l = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + kl_coef * K3`` with
    ``rho = exp(logp - old_logp)``, averaged over *all* masked tokens of the batch (a token mean, not
    a mean of per-sequence means). ``clip_eps_high=None`` uses ``clip_eps`` (symmetric PPO clip);
    DAPO's clip-higher sets it larger (e.g. 0.28) so low-probability tokens can still rise.

    Args: ``logp``, ``old_logp``, ``ref_logp`` ``[b, t]`` log-probs of the sampled tokens under the
    current, the sampling (behaviour) and the reference policy; ``advantages`` ``[b]`` (one per
    response, broadcast over its tokens); ``response_mask`` ``[b, t]``. ``ref_logp`` may be None when
    ``kl_coef == 0``.

    The token mean here is over this call's tokens; under data parallelism / micro-batching the
    caller must use the global token count for the exact DAPO mean (``metrics["tokens"]`` helps).

    Returns ``(loss, metrics)``: metrics (detached 0-d tensors) ``pg_loss``, ``kl`` (mean K3, 0 without
    a reference), ``clip_frac`` (share of tokens whose clipped branch is the active minimum, i.e. gets
    no gradient), ``ratio_mean`` and ``tokens``.
    """
    assert logp.shape == old_logp.shape == response_mask.shape, (logp.shape, old_logp.shape, response_mask.shape)
    assert advantages.shape == logp.shape[:1], (advantages.shape, logp.shape)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    dtype = _compute_dtype(logp)
    mask = response_mask.to(dtype)
    tokens = mask.sum()
    denom = tokens.clamp(min=1)

    def token_mean(x: torch.Tensor) -> torch.Tensor:
        return (x * mask).sum() / denom

    adv = advantages.detach().to(dtype).unsqueeze(-1)
    ratio = torch.exp(logp.to(dtype) - old_logp.detach().to(dtype))
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + eps_high) * adv
    pg_loss = token_mean(-torch.minimum(unclipped, clipped))
    loss = pg_loss
    if ref_logp is not None:
        kl = token_mean(k3_kl(logp, ref_logp.detach()))
        loss = loss + kl_coef * kl
    else:
        assert kl_coef == 0.0, "kl_coef > 0 needs ref_logp"
        kl = pg_loss.new_zeros(())
    metrics = {
        "pg_loss": pg_loss.detach(),
        "kl": kl.detach(),
        "clip_frac": token_mean((clipped < unclipped).to(dtype)).detach(),
        "ratio_mean": token_mean(ratio).detach(),
        "tokens": tokens.detach(),
    }
    return loss, metrics


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at the target tokens: ``[b, t, v]``, ``[b, t]`` -> ``[b, t]``.

    Upcast to float32 before anything else (bf16 logits have 8 bits of mantissa: their log-softmax
    would make ratios of 1 +- 1% noise), then ``z_k - logsumexp(z)``, which never exponentiates a
    large logit. The temperature is the sampling temperature (the policy that generated the tokens
    is ``softmax(logits / T)``; TurboS and LaSeR sample at 1.0).
    """
    assert logits.shape[:-1] == tokens.shape, (logits.shape, tokens.shape)
    assert temperature > 0, temperature
    z = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        z = z / temperature
    picked = z.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)
