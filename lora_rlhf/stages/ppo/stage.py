"""PPO's two stages under the stage contract (stages/stage.py), both trainer.train_ppo: `ppo` into OUT/ppo and
`ppo-ptx` into OUT/ppo-ptx.

`lora-rlhf ppo` is the `ppo` stage with the recipe as it is: a ptx_coef above 0 makes it PPO-ptx. In a pipeline
that also runs `ppo-ptx`, the `ppo` stage is the plain arm of the comparison (`plain`: ptx_coef 0), so the
evaluation can show what the pretraining mix buys against the alignment tax.
"""

from __future__ import annotations

import copy

from lora_rlhf.core.adapters import is_finished
from lora_rlhf.errors import RecipeError
from lora_rlhf.recipe.config import Recipe
from lora_rlhf.stages.ppo.trainer import train_ppo
from lora_rlhf.stages.stage import StageResult


def run(recipe: Recipe, *, resume: bool | None = None) -> StageResult:
    """PPO (PPO-ptx when ppo.ptx_coef > 0) into OUT/ppo."""
    return StageResult("ppo", recipe.stage_dir("ppo"), train_ppo(recipe, resume, stage="ppo"))


def run_ptx(recipe: Recipe, *, resume: bool | None = None) -> StageResult:
    """PPO-ptx into OUT/ppo-ptx."""
    problems = ptx_problems(recipe)
    if problems:
        raise RecipeError(problems)
    return StageResult("ppo-ptx", recipe.stage_dir("ppo-ptx"), train_ppo(recipe, resume, stage="ppo-ptx"))


def plain(recipe: Recipe) -> Recipe:
    """The recipe of the pipeline's `ppo` stage: no pretraining mix."""
    recipe = copy.deepcopy(recipe)
    recipe.ppo.ptx_coef = 0.0
    return recipe


def ptx_problems(recipe: Recipe) -> list[str]:
    if recipe.ppo.ptx_coef > 0 and recipe.data.ptx is not None:
        return []
    return ["pipeline stage 'ppo-ptx' needs ppo.ptx_coef > 0 and a data.ptx dataset (fix: set both, or drop 'ppo-ptx' "
            "from pipeline.stages)"]


def is_complete(recipe: Recipe) -> bool:
    return is_finished(recipe.stage_dir("ppo") / "policy")


def ptx_is_complete(recipe: Recipe) -> bool:
    return is_finished(recipe.stage_dir("ppo-ptx") / "policy")
