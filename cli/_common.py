"""Options and error handling shared by every command."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from lora_rlhf.errors import LoraRlhfError

F = TypeVar("F", bound=Callable[..., Any])

RecipeArg = Annotated[
    Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="The recipe YAML (see recipes/).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe value: section.key=value (repeatable).",
                 metavar="SECTION.KEY=VALUE"),
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint of this stage.")]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def quiet_libraries() -> None:
    """Silence import-time chatter from dependencies that says nothing actionable to our users."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for name in ("transformers", "peft", "trl", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def only_rank_zero_prints() -> None:
    """Under torchrun / accelerate launch every rank runs the command: the others' normal output would print each
    line N times. Their errors and warnings (stderr) still show, so a rank that fails says why."""
    if os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def handle_errors(fn: F) -> F:
    """User errors and a full disk -> one message on stderr and exit 2; Ctrl-C -> exit 130 (the stage has saved
    what it can)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_libraries()
        only_rank_zero_prints()
        try:
            result = fn(*args, **kwargs)
            from lora_rlhf.core import distributed  # here, not at the top: `--help` should not import torch

            distributed.finish()
            return result
        except LoraRlhfError as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except Exception as e:
            from lora_rlhf.core.io import disk_full  # the library's rule for what a full disk looks like

            if not disk_full(e):
                raise
            # sft and reward say which run folder and what was kept (StorageError); elsewhere the file, which
            # core.io.writing adds to the errors of libraries that write without an errno (safetensors, torch.save).
            where = getattr(e, "filename", None) or "a file"
            typer.echo(f"Error: no space left on the device while writing {where}: the command "
                       "stopped\n  fix: free space on that disk (or set output_dir to another one), then run it again",
                       err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted.", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def echo_err(message: str) -> None:
    typer.echo(message, err=True)
