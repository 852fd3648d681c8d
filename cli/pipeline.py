"""`lora-rlhf pipeline RECIPE.yaml`: every stage in order, skipping those already complete."""

from __future__ import annotations

from typing import Annotated

import typer

from lora_rlhf_cli._common import RecipeArg, SetOpt, handle_errors

ForceOpt = Annotated[
    list[str] | None,
    typer.Option("--force", "-f", help="Rerun this stage even if complete (repeatable; 'all' for every stage)."),
]


@handle_errors
def command(recipe: RecipeArg, set_: SetOpt = None, force: ForceOpt = None) -> None:
    """Run data -> SFT -> compare + rank -> reward -> (DPO) -> PPO(-ptx) -> eval into one output folder."""
    from lora_rlhf.recipe.config import load_recipe
    from lora_rlhf.stages.pipeline import run_pipeline

    cfg = load_recipe(recipe, set_ or [])
    typer.echo(f"pipeline: {' -> '.join(cfg.pipeline.stages)} into {cfg.output_dir}")
    results = run_pipeline(cfg, force=force or [],
                           on_stage=lambda stage, event: typer.echo(f"[{stage}] {event}"))
    total = sum(r.seconds for r in results)
    ran = [r.name for r in results if not r.skipped]
    typer.echo(f"pipeline done in {total / 60:.1f} min (ran: {', '.join(ran) or 'nothing, all complete'}); "
               f"report: {cfg.output_dir}/eval/report.md")
