"""Score (prompt, response) pairs with a reward adapter on the shared base: the one scoring path everyone uses.

    score = head(hidden state at the last real token of text.encode(prompt, response)) - reward_offset

`text.encode` defines the text the reward model sees, both in training (stages/reward.py tokenizes every
comparison with it) and here, so a PPO rollout is scored exactly as the comparisons were. `reward_offset`
(lora_rlhf.json) is the raw mean score of the SFT demonstrations, so that they score 0 on average (the
paper's bias).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lora_rlhf.core.heads import gather_last
from lora_rlhf.core.text import Prompt, batches, encode
from lora_rlhf.errors import ModelError


def reward_offset(shared_base: Any, role: str = "reward") -> float:
    return float(shared_base.roles.get(role, {}).get("reward_offset") or 0.0)


@torch.no_grad()
def score_texts(shared_base: Any, prompts: Sequence[Prompt], responses: Sequence[str], role: str = "reward",
                batch_size: int = 16, apply_offset: bool = True) -> torch.Tensor:
    """Reward of each (prompt, response) pair -> float32 tensor [N] on the base's device.

    `role` must be loaded on `shared_base` with a scalar head (SharedBase.load_adapter('reward', folder)).
    The adapter's `reward_offset` is subtracted unless `apply_offset=False` (raw head output).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if role not in shared_base.heads:
        raise ModelError(f"role '{role}' has no scalar head, so it cannot score",
                         fix="load a reward adapter (the output folder of `lora-rlhf reward`) for this role")
    tokenizer = shared_base.tokenizer
    sequences = [encode(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    scores = torch.empty(len(sequences), dtype=torch.float32, device=shared_base.device)
    model = shared_base.model
    was_training = model.training
    model.eval()  # LoRA dropout off: a score must not depend on the call
    try:
        for rows, ids, mask in batches(sequences, batch_size, tokenizer.pad_token_id, shared_base.device):
            values = shared_base.scalar(role, ids, mask)
            scores[rows] = gather_last(values, mask).float()
    finally:
        model.train(was_training)
    if apply_offset:
        scores -= reward_offset(shared_base, role)
    return scores
