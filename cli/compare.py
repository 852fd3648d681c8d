"""`lora-rlhf compare RECIPE.yaml`: sample K responses per prompt (and rank them with a labeler)."""

from __future__ import annotations

import typer

from lora_rlhf_cli._common import RecipeArg, SetOpt, handle_errors


@handle_errors
def command(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Sample compare.k responses per prompt (data.prompts) -> candidates.jsonl; with compare.labeler also
    rankings.jsonl, ready for `lora-rlhf reward`."""
    from lora_rlhf.recipe.config import load_recipe
    from lora_rlhf.stages.compare import CANDIDATES, RANKINGS, run_compare

    cfg = load_recipe(recipe, set_ or [])
    out = run_compare(cfg)
    typer.echo(f"Candidates written to {out / CANDIDATES}")
    if (out / RANKINGS).is_file() and cfg.compare.labeler:
        typer.echo(f"Rankings written to {out / RANKINGS} (labeler {cfg.compare.labeler})")
