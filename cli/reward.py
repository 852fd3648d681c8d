"""`lora-rlhf reward RECIPE.yaml`: step 2, train the reward model (a LoRA adapter + scalar head)."""

from __future__ import annotations

import typer

from lora_rlhf_cli._common import RecipeArg, ResumeOpt, SetOpt, handle_errors


@handle_errors
def command(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False) -> None:
    """Train a reward adapter on ranked comparisons or chosen/rejected pairs (data.reward) with TRL's RewardTrainer."""
    from lora_rlhf.recipe.config import load_recipe
    from lora_rlhf.stages.pipeline import with_pipeline_defaults
    from lora_rlhf.stages.registry import run_stage

    result = run_stage("reward", with_pipeline_defaults(load_recipe(recipe, set_ or [])), resume=resume)
    metrics = result.metrics
    if "reward_offset" not in metrics:  # a rank other than 0 (whose output is not shown): rank 0 checks the model
        return
    summary = f"reward_offset {metrics['reward_offset']:.3f}"
    if metrics.get("eval_pairwise_accuracy") is not None:
        summary = (f"held-out accuracy {metrics['eval_pairwise_accuracy']:.3f} "
                   f"[{metrics['eval_pairwise_accuracy_low']:.3f}, {metrics['eval_pairwise_accuracy_high']:.3f}] "
                   f"over {metrics['eval_pairs']} pairs of {metrics['eval_prompts']} prompts, {summary}")
    typer.echo(f"Reward adapter written to {result.output} ({summary})")
