"""`lora-rlhf dpo RECIPE.yaml`: direct preference optimisation of a policy adapter from the comparisons."""

from __future__ import annotations

import typer

from lora_rlhf_cli._common import RecipeArg, ResumeOpt, SetOpt, handle_errors


@handle_errors
def command(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False) -> None:
    """Train a policy adapter by DPO (TRL's DPOTrainer) on rankings or chosen/rejected pairs (data.dpo, else
    data.reward), starting from and referenced to the SFT adapter on the same base."""
    from lora_rlhf.recipe.config import load_recipe
    from lora_rlhf.stages.pipeline import with_pipeline_defaults
    from lora_rlhf.stages.registry import run_stage

    result = run_stage("dpo", with_pipeline_defaults(load_recipe(recipe, set_ or [])), resume=resume)
    metrics = result.metrics
    summary = f"{metrics['train_pairs']} pairs, reference {metrics['reference']}"
    if metrics.get("eval_rewards/accuracies") is not None:
        summary = (f"held-out implicit-reward accuracy {metrics['eval_rewards/accuracies']:.3f} over "
                   f"{metrics['eval_pairs']} pairs, {summary}")
    typer.echo(f"DPO adapter written to {result.output} ({summary})")
