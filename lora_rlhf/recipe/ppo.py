"""PPO settings. Names and meanings follow TRL's PPOConfig (<= 1.12) so a TRL recipe ports over; the paper's
additions TRL lacked (PPO-ptx, adaptive KL, reward normalisation) are marked."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lora_rlhf.recipe.schema import ranged

# ppo.report_to: tracker -> the package that must be importable for it (stages/ppo/tracking.py)
TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


@dataclass
class PPOSection:
    # --- where the roles come from
    sft_adapter: str | None = None
    """Policy init and frozen reference (default: OUT/sft when it exists; else fresh policy, bare-base reference)."""
    reward_adapter: str | None = None
    """Reward adapter folder or Hub id (default: OUT/reward)."""
    reward_fn: str | None = None
    """Instead of a reward adapter, `module:function` (prompts, responses -> scores). Value starts fresh."""
    gold_fn: str | None = None
    """[ours] `module:function` (prompts, responses -> scores) logged beside the reward every step
    (`objective/gold`) and never part of the loss: a gold standard to watch the policy over-optimise an imperfect
    reward model (Gao et al. 2022), e.g. a checker, a larger judge, or the true metric the reward model stands for."""

    value_head_init: Literal["reward", "zeros"] = "reward"
    """[ours] The value head when the value role starts from the reward adapter: `reward` copies the reward model's
    head too (the paper: the value function is initialised from the RM), `zeros` keeps the reward model's LoRA but
    starts the head at 0. The reward head scores whole answers; on a partial answer its output is not the expected
    final reward, and before the value function has learned, those per-token errors go straight into GAE's
    advantages (bench/bench_rl_learning.py measures both)."""

    # --- rollout
    total_episodes: int = ranged(256, gt=0)
    """Prompts rolled out over the whole run."""
    batch_size: int = ranged(16, gt=0)
    """Episodes per PPO step (rollout batch)."""
    local_rollout_forward_batch_size: int = ranged(16, gt=0)
    """Episodes per forward pass while generating and scoring: memory vs. speed."""
    response_length: int = ranged(64, gt=0)
    """Maximum new tokens per response."""
    max_prompt_length: int | None = ranged(512, gt=0)
    """[TRL's GRPO] Prompt tokens as generation sees them (chat template included): a rollout's memory grows with
    its longest prompt. Longer prompts are handled as long_prompts says; null: no limit."""
    long_prompts: Literal["truncate", "drop"] = "truncate"
    """`truncate`: cut the prompt's text from the left (its start, then whole earlier messages; the question at
    the end stays), as TRL's GRPO does; `drop`: leave such prompts out. Counted in the log and run.json."""
    temperature: float = ranged(0.7, gt=0, why="PPO samples")
    top_k: int = ranged(0, ge=0)
    """0 disables top-k."""
    top_p: float = ranged(1.0, ge=0, le=1)
    stop_token: Literal["eos"] | None = "eos"
    """`eos`: stop at the tokenizer's end-of-turn token; null: always generate response_length tokens."""
    missing_eos_penalty: float | None = None
    """Subtract this from the score of responses that did not end with the stop token (after normalisation)."""

    # --- reward shaping
    kl_coef: float = ranged(0.05, ge=0)
    """beta: weight of the per-token KL penalty to the reference."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """k1: log-ratio (unbiased, high variance). k3: (r - 1) - log r (unbiased, low variance, always >= 0)."""
    adaptive_kl: bool = False
    """[paper/Ziegler 2019] adapt kl_coef towards target_kl."""
    target_kl: float = ranged(6.0, gt=0)
    """Target total KL per response (nats) for the adaptive controller."""
    kl_horizon: int = ranged(10000, gt=0)
    """Adaptive controller horizon in episodes: larger = slower changes."""
    normalize_reward: bool = True
    """[ours] Standardise RM scores with running mean/std so kl_coef means the same across reward models."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards of a batch before GAE."""

    # --- advantage and losses
    advantage_estimator: Literal["gae", "rloo", "grpo"] = "gae"
    """`gae`: the paper's (a value adapter + head, trained beside the policy). [field, ours] `rloo`: each
    episode's baseline is the mean reward of the other samples of its prompt (Ahmadian et al. 2024); `grpo`:
    rewards standardised within each prompt's samples (Shao et al. 2024). rloo/grpo have no value role: no value
    forward or backward and less memory, but need num_generations >= 2."""
    num_generations: int = ranged(1, gt=0)
    """Responses sampled per prompt in a step (batch_size counts them all); >= 2 for rloo/grpo."""
    gamma: float = ranged(1.0, ge=0, le=1)
    """Discount per token (1 = none: the episode is one response)."""
    lam: float = ranged(0.95, ge=0, le=1)
    """GAE lambda: bias (0) vs. variance (1) of the advantages."""
    cliprange: float = ranged(0.2, ge=0)
    """epsilon of PPO's clipped ratio."""
    cliprange_value: float = ranged(0.2, ge=0)
    """How far a value prediction may move from its rollout value before its loss is clipped."""
    vf_coef: float = ranged(0.1, ge=0)
    """Weight of the value loss (the value adapter and head)."""
    ptx_coef: float = ranged(0.0, ge=0)
    """[paper] gamma of PPO-ptx: weight of the language-modelling loss on data.ptx (0 = plain PPO)."""
    ptx_batch_size: int = ranged(4, gt=0)
    """Rows of data.ptx per micro-batch (PPO-ptx only)."""
    ptx_max_length: int = ranged(256, gt=0)
    """Tokens per data.ptx row; longer rows are cut."""

    # --- optimisation
    num_ppo_epochs: int = ranged(4, gt=0)
    """Passes over each rollout batch."""
    num_mini_batches: int = ranged(1, gt=0)
    """Optimizer steps per pass: the batch is split into this many shuffled mini-batches."""
    gradient_accumulation_steps: int = ranged(1, gt=0)
    """Micro-batches per mini-batch (one optimizer step per mini-batch): trades speed for memory."""
    learning_rate: float = ranged(1.0e-5, ge=0)
    """AdamW learning rate of both trainable adapters and the value head."""
    max_grad_norm: float = ranged(1.0, ge=0)
    """Clip the gradient norm over policy LoRA + value LoRA + value head."""
    weight_decay: float = ranged(0.0, ge=0)
    lr_scheduler_type: Literal["linear", "constant", "cosine"] = "linear"

    # --- observability and checkpoints
    logging_steps: int = ranged(1, gt=0)
    """Print a metrics line every N PPO steps (metrics.jsonl gets every step)."""
    sample_every: int = ranged(10, gt=0)
    """Log a table of sample prompt / response / score every N steps."""
    save_steps: int = ranged(20, gt=0)
    """Checkpoint every N PPO steps (and on Ctrl-C)."""
    report_to: list[str] = None  # type: ignore[assignment]
    """Trackers: tensorboard, trackio, wandb (empty = JSONL metrics only)."""

    def __post_init__(self) -> None:
        """Checks that span several fields (each field's own range is declared with it and checked at load)."""
        if self.report_to is None:
            self.report_to = []
        problems = []

        def positive(*values: object) -> bool:  # out-of-range values are reported once, by their range
            return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)

        if positive(self.batch_size, self.num_mini_batches) and self.batch_size % self.num_mini_batches:
            problems.append(
                f"batch_size ({self.batch_size}) must be a multiple of num_mini_batches ({self.num_mini_batches})")
        if self.reward_adapter and self.reward_fn:
            problems.append("give either reward_adapter or reward_fn, not both")
        if positive(self.batch_size, self.num_mini_batches, self.gradient_accumulation_steps):
            mini = self.batch_size // self.num_mini_batches
            accum = self.gradient_accumulation_steps
            if mini % accum:
                problems.append(f"the mini-batch ({mini} = batch_size / num_mini_batches) must be a multiple of "
                                f"gradient_accumulation_steps ({accum})")
        if self.advantage_estimator in ("rloo", "grpo") and isinstance(self.num_generations, int) \
                and self.num_generations < 2:
            problems.append(f"advantage_estimator {self.advantage_estimator} compares the samples of one prompt: "
                            f"set num_generations >= 2 (got {self.num_generations})")
        if positive(self.num_generations, self.batch_size) and self.batch_size % self.num_generations:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of num_generations "
                            f"({self.num_generations}): every prompt of a step gets all its samples")
        if self.missing_eos_penalty is not None and self.stop_token is None:
            problems.append("missing_eos_penalty needs stop_token: eos (without a stop token no response ends)")
        unknown = [t for t in self.report_to if t not in TRACKERS] if isinstance(self.report_to, list) else []
        if unknown:
            problems.append(f"report_to: unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def num_steps(self) -> int:
        """PPO steps of the run: total_episodes in steps of batch_size episodes (the last may be a partial count)."""
        return math.ceil(self.total_episodes / self.batch_size)

    def world_size_problems(self, world: int, with_ptx: bool) -> list[str]:
        """What stops this section from running data-parallel on `world` ranks (empty: it fits).

        batch_size stays the global number of episodes per step. Each rank rolls out whole prompt groups, and
        each micro-batch (and ptx batch) is split evenly across ranks, so that N ranks compute exactly the
        gradient one process would.
        """
        if world <= 1:
            return []
        problems = []
        mini = self.batch_size // self.num_mini_batches
        micro = mini // self.gradient_accumulation_steps
        prompts = self.batch_size // self.num_generations
        if prompts % world:
            problems.append(f"ppo.batch_size ({self.batch_size}) = {prompts} prompts x num_generations "
                            f"({self.num_generations}) per step; the {prompts} prompts do not split over {world} "
                            f"ranks: set ppo.batch_size to a multiple of {world * self.num_generations}")
        if micro % world:
            problems.append(f"a micro-batch has {micro} episodes (batch_size / num_mini_batches / "
                            f"gradient_accumulation_steps), which does not split over {world} ranks: make it a "
                            f"multiple of {world} (e.g. ppo.batch_size={self.batch_size * world // math.gcd(micro, world)})")
        if with_ptx and self.ptx_batch_size % world:
            problems.append(f"ppo.ptx_batch_size ({self.ptx_batch_size}) does not split over {world} ranks: "
                            f"set it to a multiple of {world}")
        return problems
