"""GRPO's math (posttrain.grpo) against hand-computed numbers, a float64 loop, and a toy bandit."""

import math

import pytest
import torch

from posttrain.grpo import (
    dynamic_sampling_mask,
    group_advantages,
    k3_kl,
    policy_loss,
    prompt_filter,
    token_logprobs,
    zero_advantage_groups,
)


def test_group_advantages_hand_values():
    # group 0: rewards 1 0 0 0: mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    # group 1: rewards 1 1 0 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 1 / sqrt(3)
    # group 2: all equal -> 0 (not 0 / 0)
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1])
    groups = torch.tensor([5, 5, 5, 5, 2, 2, 2, 2, 9, 9])
    s = math.sqrt(3) / 2
    torch.testing.assert_close(group_advantages(rewards, groups),
                               torch.tensor([1.5, -0.5, -0.5, -0.5, s, s, -s, -s, 0, 0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(group_advantages(rewards, groups, normalize_std=False),
                               torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5, 0, 0]))


def test_group_advantages_matches_torch_std_float64():
    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(24, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 4, (24,), generator=g)
    out = group_advantages(rewards, groups, eps=0.0)
    for gid in groups.unique():
        r = rewards[groups == gid]
        torch.testing.assert_close(out[groups == gid], (r - r.mean()) / r.std())


def test_prompt_filter_and_dynamic_sampling():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    f = prompt_filter(rewards, groups)
    assert f.all_pass.tolist() == [True, True, False, False, False, False]
    assert f.all_fail.tolist() == [False, False, True, True, False, False]
    assert f.keep.tolist() == [False, False, False, False, True, True]
    adv = group_advantages(rewards, groups)
    assert zero_advantage_groups(adv, groups).tolist() == [True, True, True, True, False, False]
    assert dynamic_sampling_mask(adv, groups).tolist() == [False, False, False, False, True, True]
    # a group that is not all-pass / all-fail but has equal rewards (0.5 each) is still zero-advantage
    adv = group_advantages(torch.tensor([0.5, 0.5, 1.0, 0.0]), torch.tensor([0, 0, 1, 1]))
    assert zero_advantage_groups(adv, torch.tensor([0, 0, 1, 1])).tolist() == [True, True, False, False]


def _k3_loop(logp, ref_logp, lo=0.0, hi=10.0):
    out = torch.zeros_like(logp, dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in logp.shape]):
        d = float(ref_logp[tuple(idx)]) - float(logp[tuple(idx)])
        out[tuple(idx)] = min(max(math.exp(d) - d - 1, lo), hi)
    return out


def test_k3_kl_matches_loop_and_clips():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -6.0, -0.1]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, -1.0, -2.5], [-0.5, -1.0, -0.1]], dtype=torch.float64)  # d = 5 -> e^5 - 6 > 10
    kl = k3_kl(logp, ref)
    torch.testing.assert_close(kl, _k3_loop(logp, ref))
    assert kl[1, 1].item() == 10.0 and kl[0, 0].item() == 0.0
    assert k3_kl(logp, ref, clip=None)[1, 1].item() == pytest.approx(math.exp(5) - 6)


def _toy_batch(dtype):
    g = torch.Generator().manual_seed(0)
    b, t = 4, 7
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old_logp = logp + (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5)  # ratios ~ 0.6 .. 1.65
    ref_logp = logp + torch.randn(b, t, generator=g, dtype=torch.float64)
    ref_logp[0, 1] = logp[0, 1] + 4.0  # K3 = e^4 - 5 > 10: clipped
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1], dtype=torch.float64)
    lengths = [7, 5, 3, 6]
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return [x.to(dtype) for x in (logp, old_logp, ref_logp, adv)] + [mask]


def _policy_loss_loop(logp, old_logp, ref_logp, adv, mask, eps_low, eps_high, kl_coef):
    """Direct per-token float64 computation of loss, metrics and d loss / d logp."""
    n = int(mask.sum())
    loss = kl_sum = ratio_sum = 0.0
    clipped_tokens = kl_clipped = 0
    grad = torch.zeros(logp.shape, dtype=torch.float64)
    for i in range(logp.shape[0]):
        a = float(adv[i])
        for j in range(logp.shape[1]):
            if not mask[i, j]:
                continue
            ratio = math.exp(float(logp[i, j]) - float(old_logp[i, j]))
            surr1 = ratio * a
            surr2 = min(max(ratio, 1 - eps_low), 1 + eps_high) * a
            d = float(ref_logp[i, j]) - float(logp[i, j])
            k3_raw = math.exp(d) - d - 1
            k3 = min(max(k3_raw, 0.0), 10.0)
            loss += -min(surr1, surr2) + kl_coef * k3
            kl_sum += k3
            ratio_sum += ratio
            clipped = surr2 < surr1
            clipped_tokens += clipped
            kl_clipped += k3_raw > 10.0
            g = 0.0 if clipped else -ratio * a
            if 0.0 < k3_raw < 10.0:
                g += kl_coef * (1 - math.exp(d))
            grad[i, j] = g / n
    return loss / n, kl_sum / n, clipped_tokens / n, ratio_sum / n, grad, clipped_tokens, kl_clipped, n


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_policy_loss_matches_float64_loop(dtype, tol):
    logp, old_logp, ref_logp, adv, mask = _toy_batch(dtype)
    logp.requires_grad_(True)
    loss, metrics = policy_loss(logp, old_logp, adv, mask, clip_eps=0.2, clip_eps_high=0.28,
                                kl_coef=0.05, ref_logp=ref_logp)
    loss.backward()
    ref = _policy_loss_loop(logp.detach().double(), old_logp.double(), ref_logp.double(), adv.double(), mask,
                            0.2, 0.28, 0.05)
    want_loss, want_kl, want_clip, want_ratio, want_grad, n_clipped, n_kl_clipped, n = ref
    assert 0 < n_clipped < n and n_kl_clipped == 1  # the toy batch exercises both clips
    assert loss.item() == pytest.approx(want_loss, rel=tol, abs=tol)
    assert metrics["kl"].item() == pytest.approx(want_kl, rel=tol, abs=tol)
    assert metrics["clip_frac"].item() == pytest.approx(want_clip, rel=tol, abs=tol)
    assert metrics["ratio_mean"].item() == pytest.approx(want_ratio, rel=tol, abs=tol)
    assert metrics["tokens"].item() == n
    torch.testing.assert_close(logp.grad.double(), want_grad, rtol=tol, atol=tol)
    assert (logp.grad[~mask] == 0).all()


def test_policy_loss_symmetric_clip_no_kl():
    logp, old_logp, _, adv, mask = _toy_batch(torch.float64)
    loss, metrics = policy_loss(logp, old_logp, adv, mask, clip_eps=0.2)
    want = _policy_loss_loop(logp, old_logp, logp, adv, mask, 0.2, 0.2, 0.0)
    assert loss.item() == pytest.approx(want[0], rel=1e-12)
    assert metrics["clip_frac"].item() == pytest.approx(want[2]) and metrics["kl"].item() == 0.0
    # on-policy: ratio 1, nothing clipped, loss = -token mean of the advantages
    loss, metrics = policy_loss(logp, logp, adv, mask)
    per_token_adv = (adv.unsqueeze(1) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(-per_token_adv.item())
    assert metrics["ratio_mean"].item() == pytest.approx(1.0) and metrics["clip_frac"].item() == 0.0


def test_token_logprobs_matches_loop_and_is_stable():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 4
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    for temperature in (1.0, 0.7):
        out = token_logprobs(logits, tokens, temperature)
        for i in range(2):
            for j in range(3):
                z = [float(x) / temperature for x in logits[i, j]]
                want = z[int(tokens[i, j])] - math.log(sum(math.exp(v) for v in z))
                assert out[i, j].item() == pytest.approx(want, rel=1e-12)
    big = (logits * 3000).to(torch.bfloat16)  # |logits| ~ 1e4: a naive exp overflows
    out = token_logprobs(big, tokens)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and (out <= 0).all()
    torch.testing.assert_close(out, token_logprobs(big.double(), tokens).float())


def test_bandit_grpo_learns_the_rewarded_arm():
    """Softmax policy over 4 arms, reward 1 for arm 2: GRPO takes the mean reward from 0.25 to > 0.9."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    logits = torch.zeros(4, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    group = torch.zeros(8, dtype=torch.long)
    assert torch.softmax(logits, -1)[2].item() == pytest.approx(0.25)
    sampled = []
    for _ in range(40):
        arms = torch.multinomial(torch.softmax(logits.detach(), -1), 8, replacement=True, generator=gen)
        rewards = (arms == 2).float()
        sampled.append(rewards.mean().item())
        adv = group_advantages(rewards, group)
        logp = torch.log_softmax(logits, -1)[arms].unsqueeze(1)  # [8 responses, 1 token]
        loss, _ = policy_loss(logp, logp.detach(), adv, torch.ones(8, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.softmax(logits, -1)[2].item() > 0.9
    assert sum(sampled[-5:]) / 5 > 0.9
