"""Where PPO's four roles come from, checked before anything is written, then put on the base(s).

    policy     trainable LoRA: a copy of the SFT adapter (or fresh when there was no SFT)
    reference  the SFT adapter, frozen (or the bare base when there was no SFT)
    reward     the reward adapter + score head, frozen; or a Python function (ppo.reward_fn)
    value      trainable LoRA + head: a copy of the reward adapter and head (the paper), or fresh with a
               reward function; none with the value-free estimators (ppo.advantage_estimator rloo / grpo)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora_rlhf.core.adapters import base_fingerprint, check_adapter_base, read_adapter_meta, recipe_adapter
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.heads import HEAD_FILE
from lora_rlhf.core.loading import load_config
from lora_rlhf.core.plugins import load_callable
from lora_rlhf.errors import ModelError
from lora_rlhf.hub.client import local_adapter
from lora_rlhf.recipe.config import Recipe
from lora_rlhf.stages.ppo.rollout import RewardFn, RewardSource


@dataclass
class Sources:
    """Resolved role sources: local adapter folders (Hub ids already downloaded) or the reward function."""

    sft: Path | None
    reward_adapter: Path | None
    reward_fn: RewardFn | None = None
    reward_fn_spec: str | None = None
    gold_fn: RewardFn | None = None
    """ppo.gold_fn: scores logged beside the reward, never optimised."""

    def describe(self, with_value: bool = True) -> dict[str, str | None]:
        value = "fresh LoRA + head" if self.reward_fn else f"copy of {self.reward_adapter}"
        return {"policy": str(self.sft) if self.sft else "fresh LoRA",
                "reference": str(self.sft) if self.sft else "bare base",
                "reward": self.reward_fn_spec or str(self.reward_adapter),
                "value": value if with_value else "none (value-free advantages)"}


def resolve_sources(recipe: Recipe) -> Sources:
    """Find the SFT adapter and the reward; raise with a fix when PPO has no reward to optimise."""
    cfg = recipe.ppo
    sft_source = recipe_adapter(recipe, "sft", cfg.sft_adapter)
    sft = local_adapter(sft_source) if sft_source else None
    gold = load_callable(cfg.gold_fn, "ppo.gold_fn") if cfg.gold_fn else None
    if cfg.reward_fn:
        return Sources(sft, None, load_callable(cfg.reward_fn, "ppo.reward_fn"), cfg.reward_fn, gold)
    reward_dir = recipe.stage_dir("reward")
    reward_source = recipe_adapter(recipe, "reward", cfg.reward_adapter)
    if reward_source is None:
        raise ModelError(
            f"PPO has no reward: ppo.reward_adapter and ppo.reward_fn are unset and '{reward_dir}' holds no finished "
            "reward model",
            fix="run `lora-rlhf reward RECIPE` first, or set ppo.reward_adapter: <folder or Hub id>, "
                "or ppo.reward_fn: module:function (e.g. --set ppo.reward_fn=my_rewards.py:score)")
    reward = local_adapter(reward_source)
    if not (reward / HEAD_FILE).is_file():
        raise ModelError(f"reward adapter '{reward}' has no head.safetensors, so it cannot score responses",
                         fix="point ppo.reward_adapter at the output folder of `lora-rlhf reward`")
    return Sources(sft, reward, gold_fn=gold)


def check_bases(recipe: Recipe, sources: Sources) -> None:
    """Refuse adapters recorded as trained on another base from the base's config alone, before anything is
    loaded or written (loading them would fail only after PPO had created its output folder)."""
    info = {"name_or_path": recipe.model.name, "fingerprint": base_fingerprint(load_config(recipe.model))}
    for folder in (sources.sft, sources.reward_adapter):
        if folder is not None:
            check_adapter_base(folder, info)


def setup_roles(sb: SharedBase, recipe: Recipe, sources: Sources) -> RewardSource:
    """Load / create the adapters of every role on the one shared base."""
    if sources.sft is not None:
        sb.load_adapter("reference", sources.sft, trainable=False)
        sb.copy_adapter("reference", "policy", trainable=True)
    else:
        sb.add_adapter("policy", recipe.lora, trainable=True)
    with_value = recipe.ppo.advantage_estimator == "gae"  # rloo/grpo need no value role
    if sources.reward_fn is not None:
        if with_value:
            sb.add_adapter("value", recipe.lora, trainable=True)
            sb.add_head("value")
        reward = RewardSource(description=str(sources.reward_fn_spec), fn=sources.reward_fn)
    else:
        meta = sb.load_adapter("reward", sources.reward_adapter, trainable=False)
        if with_value:
            sb.copy_adapter("reward", "value", trainable=True)
            if recipe.ppo.value_head_init == "zeros":
                with torch.no_grad():
                    for p in sb.heads["value"].parameters():
                        p.zero_()
        offset = float(meta.get("reward_offset") or read_adapter_meta(sources.reward_adapter).get("reward_offset") or 0)
        reward = RewardSource(description=str(sources.reward_adapter), offset=offset)
    disable_dropout(sb)
    return reward


def disable_dropout(sb: SharedBase) -> None:
    """PPO compares log-probs of two forward passes of one policy: dropout would make the ratio noisy."""
    for module in sb.model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
