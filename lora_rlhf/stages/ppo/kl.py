"""The KL coefficient beta: fixed, or adapted towards a target KL (Ziegler et al. 2019, section 2.2).

The adaptive rule is a proportional controller on the measured KL per response:

    e = clip(KL / target - 1, -0.2, 0.2)
    beta <- beta * (1 + e * n / horizon)          n = episodes in the batch

so beta grows when the policy drifts further from the reference than `target_kl` and shrinks when it stays
closer; `horizon` (in episodes) sets how fast. Both controllers have `state_dict` / `load_state_dict` so a
resumed run continues with the same beta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_rlhf.recipe.ppo import PPOSection


@dataclass
class KLController:
    """beta, updated after every PPO step when `target` is set (adaptive), constant otherwise."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, current_kl: float, n_episodes: int) -> float:
        """Feed the batch's mean KL per response (nats); return the new beta."""
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_episodes / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = state["target"]
        self.horizon = int(state["horizon"])


def make_kl_controller(cfg: PPOSection) -> KLController:
    return KLController(cfg.kl_coef, cfg.target_kl if cfg.adaptive_kl else None, cfg.kl_horizon)


@dataclass
class RunningMoments:
    """Running mean / std of every score seen so far (Chan et al.'s parallel update, one batch at a time).

    Used to standardise reward-model scores so that `kl_coef` weighs the KL penalty against scores of unit
    scale whatever the reward model's own scale.
    """

    mean: float = 0.0
    var: float = 1.0
    count: int = 0

    def update(self, xs: list[float]) -> None:
        n = len(xs)
        if n == 0:
            return
        batch_mean = sum(xs) / n
        batch_var = sum((x - batch_mean) ** 2 for x in xs) / n
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 0.0) ** 0.5

    def normalize(self, x: float) -> float:
        return (x - self.mean) / (self.std + 1e-8) if self.count > 1 else x - self.mean

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
