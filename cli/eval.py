"""`lora-rlhf eval RECIPE.yaml`: compare base, SFT, PPO and PPO-ptx on held-out prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_rlhf_cli._common import RecipeArg, SetOpt, echo_err, handle_errors

PolicyOpt = Annotated[
    list[str] | None,
    typer.Option("--policy", "-p", metavar="NAME=ADAPTER",
                 help="A policy to evaluate (repeatable); ADAPTER is a folder or Hub id, or `base` for the bare "
                      "base. Default: base, OUT/sft and every OUT/<stage>/policy that exists."),
]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Report folder (default: OUT/eval).")]


@handle_errors
def command(recipe: RecipeArg, policy: PolicyOpt = None, set_: SetOpt = None, out: OutOpt = None) -> None:
    """Task score, reward-model score, KL to the reference, length, win rates and the alignment tax of each
    policy on data.eval; writes OUT/eval/report.md (+ results.json, responses.jsonl, plots)."""
    from lora_rlhf.recipe.config import load_recipe
    from lora_rlhf.stages.eval.evaluate import parse_policy_args
    from lora_rlhf.stages.eval.report import policy_table, win_rate_table
    from lora_rlhf.stages.registry import run_stage

    cfg = load_recipe(recipe, set_ or [])
    policies = parse_policy_args(policy) if policy else None
    result = run_stage("eval", cfg, policies=policies, out_dir=out, log=echo_err)
    typer.echo(policy_table(result.metrics))
    typer.echo("")
    typer.echo(win_rate_table(result.metrics))
    typer.echo(f"\nReport written to {result.output / 'report.md'}")
