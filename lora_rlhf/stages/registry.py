"""Every stage, registered once under its pipeline name (recipe/config.STAGES): how to run it, how to tell it is
complete, and what the pipeline needs of it. `lora-rlhf pipeline` and the stage commands run stages through here
(`run_stage`); each stage module owns its `run` and `is_complete` (the contract: stages/stage.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_rlhf.recipe.config import Recipe
from lora_rlhf.stages import compare, data, dpo, reward, sft
from lora_rlhf.stages.eval import evaluate
from lora_rlhf.stages.ppo import stage as ppo
from lora_rlhf.stages.stage import StageResult


def _none(recipe: Recipe) -> list[str]:
    return []


def _same(recipe: Recipe) -> Recipe:
    return recipe


@dataclass(frozen=True)
class Stage:
    run: Callable[..., StageResult]
    """run(recipe, *, resume, **options) -> StageResult; options are the stage's own (eval: policies, out_dir, log)."""
    is_complete: Callable[[Recipe], bool]
    pipeline_problems: Callable[[Recipe], list[str]] = _none
    """What stops the stage from running unattended in a pipeline: checked before the pipeline's first stage runs."""
    in_pipeline: Callable[[Recipe], Recipe] = _same
    """The recipe the stage runs with in a pipeline."""


REGISTRY: dict[str, Stage] = {
    "data": Stage(data.run, data.is_complete),
    "sft": Stage(sft.run, sft.is_complete),
    "compare": Stage(compare.run, compare.is_complete, compare.pipeline_problems),
    "reward": Stage(reward.run, reward.is_complete),
    "dpo": Stage(dpo.run, dpo.is_complete),
    "ppo": Stage(ppo.run, ppo.is_complete, in_pipeline=ppo.plain),
    "ppo-ptx": Stage(ppo.run_ptx, ppo.ptx_is_complete, ppo.ptx_problems),
    "eval": Stage(evaluate.run, evaluate.is_complete),
}


def run_stage(name: str, recipe: Recipe, *, resume: bool | None = None, **options: Any) -> StageResult:
    """Run stage `name` (resume: see stages/stage.py) and time it."""
    started = time.perf_counter()
    result = REGISTRY[name].run(recipe, resume=resume, **options)
    result.seconds = time.perf_counter() - started
    return result
