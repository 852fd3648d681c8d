"""A recipe -> the predicted peak memory of each of its stages (lora_rlhf.plan.estimate), from the model's config.

The planner reads the same resolved recipe the stages run (after `--set` overrides, every default filled in at
load: recipe/config.TRAINER_DEFAULTS), so its numbers are for the run that recipe starts. Nothing is loaded but a config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lora_rlhf.errors import LoraRlhfError
from lora_rlhf.plan.estimate import (
    ADAM_8BIT_BYTES,
    ADAM_BYTES,
    Base,
    Device,
    PPOShape,
    StageEstimate,
    dpo_estimate,
    eval_estimate,
    generation_estimate,
    ppo_estimate,
    reward_estimate,
    sft_estimate,
)
from lora_rlhf.plan.model_shape import ModelShape, load_shape
from lora_rlhf.recipe.config import Recipe

DEFAULT_PROMPT_LENGTH = 128  # tokens the plan assumes (--prompt-length): only PPO bounds prompts (ppo.max_prompt_length)
PLANNED_STAGES = ("sft", "compare", "reward", "dpo", "ppo", "ppo-ptx", "eval")


@dataclass(frozen=True)
class PlanContext:
    """What the recipe does not say and the plan must assume."""

    device: Device = "cpu"
    prompt_length: int = DEFAULT_PROMPT_LENGTH
    # The longest training sequence in the data, in tokens, where the stage has read its data (sft, reward, and
    # ppo-ptx's ptx rows): batches are padded to their longest row, so none is longer. Without it the plan assumes
    # max_length (ptx_max_length).
    sequence_length: int | None = None


def planning_dtype_bytes(recipe: Recipe, device: Device) -> int:
    """Compute dtype bytes as lora_rlhf.core.loading.compute_dtype resolves it: `auto` is fp32 on the CPU and
    bf16 on a GPU (the planner may plan a GPU it does not see, so `auto` on CUDA assumes a bf16-capable one)."""
    dtype = recipe.model.dtype
    if dtype == "auto":
        return 2 if device == "cuda" else 4
    return 4 if dtype == "fp32" else 2


def base_settings(recipe: Recipe, device: Device, section: str | None = None) -> Base:
    """The shared base's settings for a stage; `section` (sft / reward / dpo) adds its trainer's optimizer."""
    optim = str(recipe.trainer_args[section].get("optim", "")) if section else ""
    lora = recipe.lora
    return Base(device=device, dtype_bytes=planning_dtype_bytes(recipe, device), quant=recipe.quantization.mode,
                double_quant=recipe.quantization.double_quant, lora_r=lora.r, lora_targets=lora.target_modules,
                lora_dropout=lora.dropout, gradient_checkpointing=recipe.gradient_checkpointing(section),
                optim_state_bytes=ADAM_8BIT_BYTES if "8bit" in optim else ADAM_BYTES)


def trainer_value(recipe: Recipe, section: str, key: str) -> int:
    return int(recipe.trainer_args[section][key])


def trained_length(recipe: Recipe, section: str, ctx: PlanContext) -> int:
    """Tokens per row of an sft / reward / dpo batch: max_length, or the data's longest row when shorter (packed
    SFT rows are always max_length long)."""
    cap = trainer_value(recipe, section, "max_length")
    if not ctx.sequence_length or recipe.trainer_args[section].get("packing"):
        return cap
    return min(cap, ctx.sequence_length)


def ppo_shape(recipe: Recipe, prompt_length: int, ptx: bool, ptx_length: int | None = None) -> PPOShape:
    """PPO's numbers; `ptx_length`: the longest ptx row in tokens where known (else ppo.ptx_max_length)."""
    cfg = recipe.ppo
    micro = max(1, cfg.batch_size // cfg.num_mini_batches // cfg.gradient_accumulation_steps)
    return PPOShape(batch_size=cfg.batch_size, forward_batch=min(cfg.local_rollout_forward_batch_size, cfg.batch_size),
                    micro_batch=micro, response_length=cfg.response_length, prompt_length=prompt_length,
                    with_value=cfg.advantage_estimator == "gae", reward_adapter=cfg.reward_fn is None,
                    ptx_rows=cfg.ptx_batch_size if ptx and cfg.ptx_coef > 0 else 0,
                    ptx_length=min(cfg.ptx_max_length, ptx_length or cfg.ptx_max_length),
                    backward_passes=cfg.num_steps * cfg.num_ppo_epochs * cfg.num_mini_batches * cfg.gradient_accumulation_steps)


def ranked_responses(recipe: Recipe) -> int | None:
    """K when the reward stage learns from compare's K-wise rankings grouped by prompt (the pipeline's default
    chain, or data.reward pointing at compare's output); None when the data's shape is unknown (2 per pair)."""
    if not recipe.reward.group_by_prompt:
        return None
    rankings = str(recipe.stage_dir("compare") / "rankings.jsonl")
    chained = recipe.data.reward is None and "compare" in recipe.pipeline.stages
    if chained or (recipe.data.reward is not None and recipe.data.reward.path == rankings):
        return recipe.compare.k
    return None


def stage_estimate(recipe: Recipe, stage: str, shape: ModelShape, ctx: PlanContext) -> StageEstimate:
    """The prediction for one stage of `recipe` (sft, compare, reward, dpo, ppo, ppo-ptx, eval)."""
    q = ctx.prompt_length
    if stage == "sft":
        return sft_estimate(shape, base_settings(recipe, ctx.device, "sft"),
                            trainer_value(recipe, "sft", "per_device_train_batch_size"),
                            trained_length(recipe, "sft", ctx))
    if stage == "reward":
        return reward_estimate(shape, base_settings(recipe, ctx.device, "reward"),
                               trainer_value(recipe, "reward", "per_device_train_batch_size"),
                               trained_length(recipe, "reward", ctx), ranked_responses(recipe))
    if stage == "dpo":
        base = base_settings(recipe, ctx.device, "dpo")
        if recipe.trainer_args["dpo"]["disable_dropout"]:
            base = replace(base, lora_dropout=0.0)  # TRL sets every dropout to p=0: no dropped-out copies
        return dpo_estimate(shape, base, trainer_value(recipe, "dpo", "per_device_train_batch_size"),
                            trained_length(recipe, "dpo", ctx))
    base = base_settings(recipe, ctx.device)
    if stage in ("ppo", "ppo-ptx"):
        # PPO sets every dropout to p=0 (stages/ppo/roles.disable_dropout): torch then returns the input, no copy
        base = replace(base, lora_dropout=0.0)
        ptx = stage == "ppo-ptx"
        q = min(q, recipe.ppo.max_prompt_length or q)  # longer prompts are cut (or dropped) before rollouts
        return ppo_estimate(shape, base, ppo_shape(recipe, q, ptx, ctx.sequence_length if ptx else None), stage)
    if stage == "compare":
        c = recipe.compare
        return generation_estimate(shape, base, c.batch_size * c.k, q, c.max_new_tokens, adapters=1, stage="compare")
    if stage == "eval":
        e = recipe.eval
        # the general texts (when eval.general_text is set) are scored longer than the sampled sequences
        length = max(q + e.max_new_tokens, e.general_max_tokens if e.general_text else 0)
        return eval_estimate(shape, base, e.batch_size, q, e.max_new_tokens, length)
    raise LoraRlhfError(f"no memory plan for stage '{stage}'", fix=f"plan one of: {', '.join(PLANNED_STAGES)}")


def recipe_stages(recipe: Recipe) -> list[str]:
    """The stages the recipe's pipeline runs that load a model (data is the recipe's own builder: not planned)."""
    return [s for s in recipe.pipeline.stages if s in PLANNED_STAGES]


def plan_recipe(recipe: Recipe, ctx: PlanContext, stages: list[str] | None = None,
                shape: ModelShape | None = None) -> list[StageEstimate]:
    """Every stage's prediction, in pipeline order."""
    shape = shape or load_shape(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    return [stage_estimate(recipe, s, shape, ctx) for s in (stages or recipe_stages(recipe))]
