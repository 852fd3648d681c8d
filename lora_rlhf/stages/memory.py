"""Each stage's memory: the planner's preflight before anything loads, then the stage's own peak beside it.

Inside `pipeline` several stages run in one process; when each starts, the memory earlier stages freed is handed
back (core.memory) and the high-water mark is reset, so a stage reports its own peak (PPO no longer shows the
reward stage's), next to what `lora-rlhf plan` predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_rlhf.core.loading import resolve_device
from lora_rlhf.core.memory import release_freed
from lora_rlhf.plan.preflight import peak_bytes, peak_reserved_bytes, preflight, reset_peak
from lora_rlhf.recipe.config import Recipe


@dataclass
class StageMemory:
    device: torch.device
    predicted: int  # bytes; 0 when the model's config could not be read

    def peak_gb(self) -> float:
        """This stage's peak so far: GB allocated on a GPU, resident GB on the CPU."""
        return peak_bytes(self.device) / 2**30

    def peak_reserved_gb(self) -> float | None:
        """On CUDA, what the caching allocator held at the peak (allocated + fragmentation); None on the CPU."""
        reserved = peak_reserved_bytes(self.device)
        return None if reserved is None else reserved / 2**30

    def metrics(self) -> dict[str, float]:
        """Peak and prediction; on CUDA also the reserved peak, which the prediction's allocator headroom covers
        and which is what runs out (the allocated peak alone is blind to fragmentation)."""
        out = {"memory/peak_gb": round(self.peak_gb(), 3), "memory/predicted_gb": round(self.predicted / 2**30, 3)}
        reserved = self.peak_reserved_gb()
        if reserved is not None:
            out["memory/peak_reserved_gb"] = round(reserved, 3)
        return out


def check_memory(recipe: Recipe, stage: str, sequence_length: int | None = None,
                 prompt_length: int | None = None) -> StageMemory:
    """Stop (exit 2, with the knobs that fit) when `stage` is predicted not to fit; then start its peak.

    stage: sft | compare | reward | dpo | ppo | ppo-ptx | eval; sequence_length: the longest training row in tokens
    (sft, reward, dpo, ppo-ptx's ptx rows), so the prediction is for the data rather than max_length; prompt_length:
    the longest prompt in tokens (compare, ppo, eval; planned at no fewer than 128, see `preflight`).
    LORA_RLHF_SKIP_PREFLIGHT=1 starts it anyway.
    """
    device = resolve_device(recipe.model)
    release_freed(device)  # what an earlier stage of this process freed is neither this stage's nor in use
    predicted = preflight(recipe, stage, device, prompt_length=prompt_length, sequence_length=sequence_length)
    reset_peak(device)
    return StageMemory(device, predicted)
