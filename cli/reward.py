"""`lora-rlhf reward RECIPE.yaml`: step 2, train the reward model (a LoRA adapter + scalar head)."""

from __future__ import annotations

import json

import typer

from cli._common import RecipeArg, ResumeOpt, SetOpt, handle_errors


@handle_errors
def command(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False) -> None:
    """Train a reward adapter on ranked comparisons or chosen/rejected pairs (data.reward) with TRL's RewardTrainer."""
    from lora_rlhf.recipe.config import load_recipe
    from lora_rlhf.stages.reward import run_reward

    cfg = load_recipe(recipe, set_ or [])
    out = run_reward(cfg, resume=resume)
    metrics = json.loads((out / "metrics.json").read_text())
    summary = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("eval_pairwise_accuracy", "reward_offset") if k in metrics
                        and metrics[k] is not None)
    typer.echo(f"Reward adapter written to {out}" + (f" ({summary})" if summary else ""))
