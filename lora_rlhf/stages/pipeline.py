"""The whole InstructGPT recipe in one command: data -> SFT -> compare + rank -> RM -> (DPO) -> PPO(-ptx) -> eval.

Every stage writes into the recipe's output folder and is skipped when its output is complete (each stage
writes its completion marker last), so an interrupted pipeline resumes where it stopped; `force` reruns the
named stages (or all). Stages run in the order of `pipeline.stages`; each is the same library call as its own
command (`lora-rlhf sft`, `reward`, ...), so a pipeline run and a hand-run sequence give the same folders.

`ppo` runs PPO without the pretraining mix (ptx_coef = 0) into OUT/ppo; `ppo-ptx` runs PPO-ptx with the
recipe's ptx_coef into OUT/ppo-ptx, so the evaluation can show what ptx buys against the alignment tax. The
optional `dpo` stage trains a policy by DPO from the same comparisons as the reward model into OUT/dpo, which the
evaluation puts in the same table.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_rlhf.core import distributed
from lora_rlhf.core.adapters import is_finished
from lora_rlhf.core.plugins import load_callable
from lora_rlhf.errors import RecipeError
from lora_rlhf.recipe.config import STAGES, DatasetConfig, Recipe
from lora_rlhf.stages.compare import RANKINGS, run_compare
from lora_rlhf.stages.dpo import run_dpo
from lora_rlhf.stages.eval.evaluate import EVAL_DIR, RESULTS_FILE, run_eval
from lora_rlhf.stages.ppo.trainer import train_ppo
from lora_rlhf.stages.reward import run_reward
from lora_rlhf.stages.sft import run_sft


@dataclass
class StageResult:
    name: str
    skipped: bool
    seconds: float
    output: Path | None


def _data_complete(recipe: Recipe) -> bool:
    specs = [getattr(recipe.data, f) for f in ("sft", "prompts", "ptx", "eval", "reward")]
    return all(Path(s.path).is_file() for s in specs if s is not None and _is_local(s.path))


def _is_local(path: str) -> bool:
    return Path(path).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet")


def with_pipeline_defaults(recipe: Recipe) -> Recipe:
    """Chain the stages: without data.reward, the reward model (and DPO, without data.dpo) learns from compare's
    rankings."""
    recipe = copy.deepcopy(recipe)
    if recipe.data.reward is None and "compare" in recipe.pipeline.stages:
        recipe.data.reward = DatasetConfig(path=str(recipe.stage_dir("compare") / "rankings.jsonl"),
                                           eval_fraction=recipe.pipeline.reward_eval_fraction)
    return recipe


def ppo_variant(recipe: Recipe, stage: str) -> Recipe:
    """`ppo`: plain PPO (ptx_coef 0). `ppo-ptx`: the recipe's ptx_coef, which must then be positive."""
    variant = copy.deepcopy(recipe)
    if stage == "ppo":
        variant.ppo.ptx_coef = 0.0
    elif recipe.ppo.ptx_coef <= 0 or recipe.data.ptx is None:
        raise RecipeError(["pipeline stage 'ppo-ptx' needs ppo.ptx_coef > 0 and a data.ptx dataset "
                           "(fix: set both, or drop 'ppo-ptx' from pipeline.stages)"])
    return variant


def is_complete(recipe: Recipe, stage: str) -> bool:
    """A stage is complete when its output is finished: the same tests the later stages use to find it."""
    if stage == "data":
        return _data_complete(recipe)
    if stage in ("sft", "reward", "dpo"):
        return is_finished(recipe.stage_dir(stage), "reward" if stage == "reward" else "policy")
    if stage in ("ppo", "ppo-ptx"):
        return is_finished(recipe.stage_dir(stage) / "policy")
    if stage == "compare":
        return (recipe.stage_dir("compare") / RANKINGS).is_file()
    return (recipe.stage_dir(EVAL_DIR) / RESULTS_FILE).is_file()


def _run_stage(recipe: Recipe, stage: str) -> Path | None:
    if stage == "data":
        if not recipe.pipeline.data_builder:
            return None  # the datasets are the user's own files; each stage validates what it reads
        builder = load_callable(recipe.pipeline.data_builder, "pipeline.data_builder")
        if distributed.is_main():  # the files are written once; the other ranks read them after the barrier
            builder(recipe, **recipe.pipeline.data_builder_args)
        distributed.barrier("the end of the data stage (rank 0 builds the datasets)")
        return Path(recipe.output_dir) / "data"
    if stage == "sft":
        return run_sft(recipe)
    if stage == "compare":
        if not recipe.compare.labeler:
            raise RecipeError(["pipeline stage 'compare' needs compare.labeler to rank the samples without people "
                               "(fix: set it to a `module:function` or a reward adapter, or label "
                               "OUT/compare/candidates.jsonl with `lora-rlhf label` and set data.reward)"])
        return run_compare(recipe)
    if stage == "reward":
        return run_reward(recipe)
    if stage == "dpo":
        return run_dpo(recipe)
    if stage in ("ppo", "ppo-ptx"):
        train_ppo(ppo_variant(recipe, stage), stage=stage)
        return recipe.stage_dir(stage)
    if stage == "eval":
        return run_eval(recipe, log=print)[1]
    raise AssertionError(stage)


def run_pipeline(recipe: Recipe, force: list[str] | None = None,
                 on_stage: Callable[[str, str], None] = lambda stage, event: None) -> list[StageResult]:
    """Run the recipe's stages in order, skipping complete ones. `force`: stage names, or ["all"]."""
    force = force or []
    unknown = [s for s in force if s not in STAGES and s != "all"]
    if unknown:
        raise RecipeError([f"--force: unknown stage '{s}' (stages: {', '.join(STAGES)}, or all)" for s in unknown])
    recipe = with_pipeline_defaults(recipe)
    distributed.configure(recipe)
    if "ppo-ptx" in recipe.pipeline.stages:
        ppo_variant(recipe, "ppo-ptx")  # fail now, not after an hour of SFT and reward training
    results = []
    for stage in recipe.pipeline.stages:
        if is_complete(recipe, stage) and stage not in force and "all" not in force:
            on_stage(stage, "skipped")
            results.append(StageResult(stage, True, 0.0, None))
            continue
        on_stage(stage, "started")
        started = time.perf_counter()
        output = _run_stage(recipe, stage)
        results.append(StageResult(stage, False, time.perf_counter() - started, output))
        on_stage(stage, f"done in {results[-1].seconds:.0f} s")
    return results
