"""`lora-rlhf merge`: fold an adapter into a full-precision copy of its base, for serving without PEFT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_rlhf_cli._common import handle_errors


@handle_errors
def command(
    adapter: Annotated[str, typer.Argument(help="Adapter folder or Hub reference (user/name[@rev][:subfolder]).")],
    out_dir: Annotated[Path, typer.Argument(help="New folder for the merged model (must not exist, or be empty).")],
    dtype: Annotated[str, typer.Option("--dtype", help="bf16, fp16 or fp32 (never 4-bit: re-quantizing rounds "
                                                       "the LoRA update away).")] = "bf16",
    model: Annotated[str | None, typer.Option("--model", help="Base to merge into (default: the one recorded in "
                                                              "the adapter's lora_rlhf.json).")] = None,
) -> None:
    """Merge an adapter into its base and save a plain transformers model folder."""
    from lora_rlhf.hub.merge import (
        merge_adapter,  # torch: imported only when the command runs, not for --help
    )

    result = merge_adapter(adapter, out_dir, dtype=dtype, model=model)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"Merged {adapter} into {result.base} ({result.dtype}, {result.kind}): {result.out_dir}")
