"""`lora-rlhf pull`: copy an adapter repo from the Hugging Face Hub into a local folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_rlhf_cli._common import handle_errors


@handle_errors
def command(
    repo: Annotated[str, typer.Argument(help="user/name, user/name@revision, or user/name:subfolder.")],
    dest: Annotated[Path, typer.Argument(help="New folder to write (must not exist, or be empty).")],
) -> None:
    """Download adapters (safetensors and their JSON/YAML/Markdown files; never pickles)."""
    from lora_rlhf.hub import (
        client as hub,  # torch comes with it: import when the command runs, not for --help
    )

    folders = hub.pull(repo, dest)
    typer.echo(f"Pulled {repo} into {dest}; adapters:")
    for folder in folders:
        typer.echo(f"  {folder}")
