"""PPO's arithmetic as pure functions: tensors in, tensors (and stats) out. No logging, no models.

Shapes: B = episodes in the (micro-)batch, R = response positions (the generated tokens, right padded).
`mask` [B, R] is 1 for a response's real tokens (the stop token included) and 0 for the padding after it; it
is always built from response lengths, never from token identity.

References: Schulman et al. 2017 (clipped objective, eq. 7), Schulman et al. 2016 (GAE), Ziegler et al. 2019
and Ouyang et al. 2022 (per-token KL penalty), J. Schulman, "Approximating KL divergence" (k1, k3).
"""

from __future__ import annotations

from typing import Literal

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1. values, mask [...] -> scalar (or reduced along `dim`)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is 1 (Bessel-corrected when `unbiased`). [...] -> scalar."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Standardise `values` to unit variance over the masked entries; zero mean too when `shift_mean`.

    [...] -> [...]. With shift_mean=False the mean is added back (used on rewards, whose sign matters).
    Masked-out entries come back as 0.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               estimator: Literal["k1", "k3"] = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens. [B, R], [B, R] -> [B, R].

    With log r = ref_logprob - logprob:  k1 = -log r  (unbiased, can be negative per token);
    k3 = (r - 1) - log r  (unbiased, lower variance, never negative).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's per-token reward: -kl_coef * KL at every response token, plus the score at the last one.

    scores [B], kl [B, R], mask [B, R] (each row has >= 1 real token) -> (rewards [B, R], non_score [B, R]).
    """
    mask = mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards = non_score.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, non_score


def sequence_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """One reward per episode for the value-free estimators: score - kl_coef * (sum of the per-token KL).

    scores [B], kl [B, R], mask [B, R] -> [B]. The same KL penalty as `shaped_rewards`, summed over the response.
    """
    return scores - kl_coef * (kl * mask.to(kl.dtype)).sum(1)


def group_advantages(rewards: torch.Tensor, group_size: int, method: Literal["rloo", "grpo"],
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantages without a value function, from the K = group_size samples of each prompt. [B] -> [B].

    Rows come in consecutive groups of K (B = prompts x K).
    rloo: A_i = r_i - mean_{j != i} r_j  (leave-one-out baseline: unbiased, K >= 2).
    grpo: A_i = (r_i - mean_j r_j) / (std_j r_j + eps)  (a prompt whose samples all tie gets 0).
    """
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not form groups of {group_size} (>= 2)")
    grouped = rewards.view(-1, group_size)
    if method == "rloo":
        baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
        return (grouped - baseline).reshape(-1)
    if method == "grpo":
        centred = grouped - grouped.mean(1, keepdim=True)
        return (centred / (grouped.std(1, keepdim=True) + eps)).reshape(-1)
    raise ValueError(f"unknown advantage estimator {method!r} (rloo or grpo)")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response. [B, R] x3 -> (advantages [B, R], returns [B, R]).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}; the episode ends after its
    last real token (V = 0 beyond it). Returns are A + V, the value function's regression target. Both are 0
    on padding.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, negated to be minimised. [B, R] x4 -> (loss scalar, stats).

    loss = mean over real tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), ratio = exp(new - old).
    stats (detached scalars): clipfrac (share of tokens where the clipped term won), approxkl
    (0.5 * mean (new - old)^2), ratio (mean ratio).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value regression. [B, R] x4 -> (loss scalar, stats).

    loss = 0.5 * mean over real tokens of max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).
    stats: clipfrac (share of tokens where the clipped term won).
    """
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_loss > unclipped_loss).to(values.dtype), mask)}
    return loss, stats
