"""PPO settings. Names and meanings follow TRL's PPOConfig (<= 1.12) so a TRL recipe ports over; the paper's
additions TRL lacked (PPO-ptx, adaptive KL, reward normalisation) are marked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class PPOSection:
    # --- where the roles come from
    sft_adapter: str | None = None
    """Policy init and frozen reference (default: OUT/sft when it exists; else fresh policy, bare-base reference)."""
    reward_adapter: str | None = None
    """Reward adapter folder or Hub id (default: OUT/reward)."""
    reward_fn: str | None = None
    """Instead of a reward adapter, `module:function` (prompts, responses -> scores). Value starts fresh."""

    # --- rollout
    total_episodes: int = 256
    """Prompts rolled out over the whole run."""
    batch_size: int = 16
    """Episodes per PPO step (rollout batch)."""
    local_rollout_forward_batch_size: int = 16
    """Episodes per forward pass while generating and scoring: memory vs. speed."""
    response_length: int = 64
    """Maximum new tokens per response."""
    temperature: float = 0.7
    top_k: int = 0
    """0 disables top-k."""
    top_p: float = 1.0
    stop_token: Literal["eos"] | None = "eos"
    """`eos`: stop at the tokenizer's end-of-turn token; null: always generate response_length tokens."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of responses that did not end with the stop token."""

    # --- reward shaping
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty to the reference."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """k1: log-ratio (unbiased, high variance). k3: (r - 1) - log r (unbiased, low variance, always >= 0)."""
    adaptive_kl: bool = False
    """[paper/Ziegler 2019] adapt kl_coef towards target_kl."""
    target_kl: float = 6.0
    """Target total KL per response (nats) for the adaptive controller."""
    kl_horizon: int = 10000
    """Adaptive controller horizon in episodes: larger = slower changes."""
    normalize_reward: bool = True
    """[ours] Standardise RM scores with running mean/std so kl_coef means the same across reward models."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards of a batch before GAE."""

    # --- advantage and losses
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ptx_coef: float = 0.0
    """[paper] gamma of PPO-ptx: weight of the language-modelling loss on data.ptx (0 = plain PPO)."""
    ptx_batch_size: int = 4

    # --- optimisation
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1.0e-5
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    lr_scheduler_type: Literal["linear", "constant", "cosine"] = "linear"

    # --- observability and checkpoints
    logging_steps: int = 1
    sample_every: int = 10
    """Log a table of sample prompt / response / score every N steps."""
    save_steps: int = 20
    """Checkpoint every N PPO steps (and on Ctrl-C)."""
    report_to: list[str] = None  # type: ignore[assignment]
    """Trackers: tensorboard, trackio, wandb (empty = JSONL metrics only)."""

    def __post_init__(self) -> None:
        if self.report_to is None:
            self.report_to = []
        problems = []
        if isinstance(self.batch_size, int) and isinstance(self.num_mini_batches, int):
            if self.num_mini_batches <= 0 or self.batch_size % self.num_mini_batches:
                problems.append(
                    f"batch_size ({self.batch_size}) must be a multiple of num_mini_batches ({self.num_mini_batches})"
                )
        if isinstance(self.kl_coef, (int, float)) and self.kl_coef < 0:
            problems.append(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.reward_adapter and self.reward_fn:
            problems.append("give either reward_adapter or reward_fn, not both")
        if problems:
            raise ValueError("; ".join(problems))
