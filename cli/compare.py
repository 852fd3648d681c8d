"""`lora-rlhf compare RECIPE.yaml`: sample K responses per prompt (and rank them with a labeler)."""

from __future__ import annotations

import typer

from lora_rlhf_cli._common import RecipeArg, SetOpt, handle_errors


@handle_errors
def command(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Sample compare.k responses per prompt (data.prompts) -> candidates.jsonl; with compare.labeler also
    rankings.jsonl, ready for `lora-rlhf reward`."""
    from lora_rlhf.recipe.config import load_recipe
    from lora_rlhf.stages.compare import CANDIDATES, RANKINGS
    from lora_rlhf.stages.registry import run_stage

    result = run_stage("compare", load_recipe(recipe, set_ or []))
    typer.echo(f"Candidates written to {result.output / CANDIDATES}")
    if result.metrics["labeler"]:
        typer.echo(f"Rankings written to {result.output / RANKINGS} (labeler {result.metrics['labeler']})")
