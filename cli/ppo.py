"""`lora-rlhf ppo RECIPE.yaml`: step 3, PPO with a KL penalty (and PPO-ptx) on one shared base."""

from __future__ import annotations

import typer

from lora_rlhf_cli._common import RecipeArg, ResumeOpt, SetOpt, handle_errors


@handle_errors
def command(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False) -> None:
    """Optimise the policy adapter against the reward model (or ppo.reward_fn) with PPO; Ctrl-C saves a checkpoint."""
    from lora_rlhf.recipe.config import load_recipe
    from lora_rlhf.stages.registry import run_stage

    result = run_stage("ppo", load_recipe(recipe, set_ or []), resume=resume)
    metrics, out = result.metrics, result.output
    summary = ", ".join(f"{name} {metrics[key]:.3f}" for key, name in
                        (("objective/scores", "score"), ("objective/kl", "KL")) if key in metrics)
    typer.echo(f"PPO policy written to {out / 'policy'}, value to {out / 'value'}" + (f" ({summary})" if summary else ""))
