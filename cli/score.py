"""`lora-rlhf score ADAPTER`: reward of (prompt, response) pairs under a reward adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lora_rlhf_cli._common import SetOpt, handle_errors


@handle_errors
def command(
    adapter: Annotated[str, typer.Argument(help="Reward adapter folder (output of `lora-rlhf reward`) or Hub id.")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The prompt (one user turn).")] = None,
    response: Annotated[str | None, typer.Option("--response", help="The response to score.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", exists=True, dir_okay=False,
                                              help="JSONL with prompt + response (or responses) per line.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write scored JSONL here (default stdout).")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", "-r", exists=True, dir_okay=False,
                                                help="Take model/quantization from this recipe.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Base model (default: the adapter's own base).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Texts per forward pass.")] = 16,
    set_: SetOpt = None,
) -> None:
    """Score (prompt, response) pairs: the head's output minus the adapter's reward_offset (higher is better)."""
    from lora_rlhf.core.scoring import score_texts
    from lora_rlhf.errors import DataError
    from lora_rlhf.stages.inference import open_adapter, read_pairs, score_rows

    if file is None and (prompt is None or response is None):
        raise DataError("nothing to score", fix="give --prompt P --response R, or --file pairs.jsonl")
    rows = read_pairs(file) if file is not None else None  # validated before the model loads
    shared, _ = open_adapter(adapter, "reward", recipe=recipe, model=model, overrides=set_ or [])
    if rows is None:
        typer.echo(f"{float(score_texts(shared, [prompt], [response], batch_size=batch_size)[0]):.4f}")
        return
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in score_rows(shared, rows, batch_size))
    if output is None:
        typer.echo(lines, nl=False)
    else:
        output.write_text(lines)
        typer.echo(f"{len(rows)} scored lines written to {output}", err=True)
