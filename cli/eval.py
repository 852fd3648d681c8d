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
    from lora_rlhf.stages.eval.evaluate import parse_policy_args, run_eval
    from lora_rlhf.stages.eval.report import policy_table, win_rate_table

    cfg = load_recipe(recipe, set_ or [])
    policies = parse_policy_args(policy) if policy else None
    result, folder = run_eval(cfg, policies, out, log=echo_err)
    data = result.as_dict()
    typer.echo(policy_table(data))
    typer.echo("")
    typer.echo(win_rate_table(data))
    typer.echo(f"\nReport written to {folder / 'report.md'}")
