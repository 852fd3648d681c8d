"""The whole InstructGPT recipe in one command: data -> SFT -> compare + rank -> RM -> (DPO) -> PPO(-ptx) -> eval.

Every stage writes into the recipe's output folder and is skipped when its output is complete (each stage
writes its completion marker last), so an interrupted pipeline resumes where it stopped; `force` reruns the
named stages (or all). Stages run in the order of `pipeline.stages`, each through the stage registry
(stages/registry.py) as its own command (`lora-rlhf sft`, `reward`, ...) runs it, so a pipeline run and a hand-run
sequence give the same folders.

`ppo` runs PPO without the pretraining mix (ptx_coef = 0) into OUT/ppo; `ppo-ptx` runs PPO-ptx with the
recipe's ptx_coef into OUT/ppo-ptx, so the evaluation can show what ptx buys against the alignment tax. The
optional `dpo` stage trains a policy by DPO from the same comparisons as the reward model into OUT/dpo, which the
evaluation puts in the same table.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from lora_rlhf.core import distributed
from lora_rlhf.errors import RecipeError
from lora_rlhf.recipe.config import STAGES, DatasetConfig, Recipe
from lora_rlhf.stages.registry import REGISTRY, run_stage
from lora_rlhf.stages.stage import StageResult


def with_pipeline_defaults(recipe: Recipe) -> Recipe:
    """Chain the stages: without data.reward, the reward model (and DPO, without data.dpo) learns from compare's
    rankings."""
    recipe = copy.deepcopy(recipe)
    if recipe.data.reward is None and "compare" in recipe.pipeline.stages:
        recipe.data.reward = DatasetConfig(path=str(recipe.stage_dir("compare") / "rankings.jsonl"),
                                           eval_fraction=recipe.pipeline.reward_eval_fraction)
    return recipe


def is_complete(recipe: Recipe, stage: str) -> bool:
    """A stage is complete when its output is finished: the same tests the later stages use to find it."""
    return REGISTRY[stage].is_complete(recipe)


def run_pipeline(recipe: Recipe, force: list[str] | None = None,
                 on_stage: Callable[[str, str], None] = lambda stage, event: None) -> list[StageResult]:
    """Run the recipe's stages in order, skipping complete ones. `force`: stage names, or ["all"]."""
    force = force or []
    unknown = [s for s in force if s not in STAGES and s != "all"]
    if unknown:
        raise RecipeError([f"--force: unknown stage '{s}' (stages: {', '.join(STAGES)}, or all)" for s in unknown])
    recipe = with_pipeline_defaults(recipe)
    distributed.configure(recipe)
    stages = recipe.pipeline.stages

    def runs(name: str) -> bool:
        return name in force or "all" in force or not is_complete(recipe, name)

    # fail now, not after an hour of SFT and reward training
    problems = [p for name in stages if runs(name) for p in REGISTRY[name].pipeline_problems(recipe)]
    if problems:
        raise RecipeError(problems)
    results = []
    for name in stages:
        if not runs(name):
            on_stage(name, "skipped")
            results.append(StageResult(name, None, skipped=True))
            continue
        on_stage(name, "started")
        results.append(run_stage(name, REGISTRY[name].in_pipeline(recipe)))
        on_stage(name, f"done in {results[-1].seconds:.0f} s")
    return results
