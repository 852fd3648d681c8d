"""`lora-rlhf push`: upload adapters with model cards to the Hugging Face Hub."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from lora_rlhf.hub import WHAT_CHOICES
from lora_rlhf_cli._common import handle_errors

What = Enum("What", {name: name for name in WHAT_CHOICES}, type=str)


@handle_errors
def command(
    output_dir: Annotated[Path, typer.Argument(exists=True, file_okay=False,
                                               help="A stage folder (OUT/sft, OUT/reward, OUT/dpo, OUT/ppo/policy) "
                                                    "or a run folder (OUT, OUT/ppo).")],
    repo_id: Annotated[str, typer.Argument(help="user/name on the Hub; created when missing.")],
    what: Annotated[What | None, typer.Option(
        "--what", help="Which adapters of a run folder: policy (PPO's, else DPO's, else SFT's; the default), dpo, "
                       "reward, value, or all (policy at the root, the others in subfolders).")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (an existing repo keeps its "
                                                            "visibility).")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to commit to (created from main when "
                                                                    "missing).")] = None,
    base_model: Annotated[str | None, typer.Option("--base-model", help="Hub id for the card's base_model when "
                                                                        "the base was a local folder.")] = None,
    license: Annotated[str | None, typer.Option("--license", help="License for the card (default: the base "
                                                                  "model's, when known).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the files and the card; upload nothing.")] = False,
) -> None:
    """Upload adapters (safetensors, JSON, YAML, Markdown only) with a model card each."""
    from lora_rlhf.hub import (
        client as hub,  # torch comes with it: import when the command runs, not for --help
    )

    plan = hub.plan_push(output_dir, repo_id, what=what.value if what else None, revision=revision,
                         private=private, base_model=base_model, license=license)
    hub.check_no_secrets(plan, hub.hub_token())  # a dry run refuses exactly what the push would refuse
    target = f"{plan.repo_id} (branch {plan.revision or 'main'}{', private' if private else ''})"
    typer.echo(f"{'Would upload' if dry_run else 'Uploading'} {len(plan.files)} files to {target}:")
    for path in plan.files:
        typer.echo(f"  {path:<45} {plan.size(path):>12,d} B")
    typer.echo(f"commit: {plan.commit_message}")
    if dry_run:
        typer.echo("\n" + plan.text("README.md"))
        return
    url = hub.push(plan)
    typer.echo(f"Done: {url}")
