"""`lora-rlhf sft RECIPE.yaml`: step 1, supervised fine-tuning."""

from __future__ import annotations

import typer

from lora_rlhf_cli._common import RecipeArg, ResumeOpt, SetOpt, handle_errors


@handle_errors
def command(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False) -> None:
    """Train a LoRA/QLoRA adapter on the recipe's demonstrations (data.sft) with TRL's SFTTrainer."""
    from lora_rlhf.recipe.config import load_recipe
    from lora_rlhf.stages.registry import run_stage

    result = run_stage("sft", load_recipe(recipe, set_ or []), resume=resume)
    typer.echo(f"SFT adapter written to {result.output}")
