"""Intervals over prompts: pure functions of tensors (no model, no logging), shared by the reward stage's held-out
accuracy and eval's paired differences."""

from __future__ import annotations

import torch


def bootstrap_interval(totals: torch.Tensor, counts: torch.Tensor | None = None, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(totals) / sum(counts) over groups (prompts) drawn with replacement.

    totals: [G] what each group adds to the statistic (a prompt's wins, or its score difference); counts: [G] the
    items each group holds (its pairs), default one each, making the statistic the mean over groups. Whole groups are
    drawn, so the items of one group move together: the pairs of one prompt share its responses, and an interval
    that drew single pairs would be too narrow. The groups are drawn n_boot times (seeded); (low, high) are the
    (1 - level) / 2 and (1 + level) / 2 quantiles of the drawn statistics.
    """
    if totals.ndim != 1 or len(totals) == 0 or (counts is not None and counts.shape != totals.shape):
        raise ValueError(f"need one total (and count) per group and at least one group, got totals of shape "
                         f"{tuple(totals.shape)} and counts of shape {None if counts is None else tuple(counts.shape)}")
    counts = torch.ones_like(totals, dtype=torch.float64) if counts is None else counts.to(torch.float64)
    per_group = torch.stack([totals.to(torch.float64), counts], 1)  # [G, 2]
    generator = torch.Generator().manual_seed(seed)
    n = len(per_group)
    draws = per_group[torch.randint(n, (n_boot, n), generator=generator)].sum(1)  # [n_boot, 2]
    tail = (1 - level) / 2
    low, high = torch.quantile(draws[:, 0] / draws[:, 1], torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(low), float(high)
