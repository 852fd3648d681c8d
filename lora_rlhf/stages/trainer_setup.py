"""What the two TRL-trained stages (sft, reward) share: Trainer arguments, the output folder, checkpoints, and
the loss summary, so that both behave alike on resume, interruption and precision."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lora_rlhf.core.adapters import META_FILE
from lora_rlhf.core.loading import compute_dtype, resolve_device
from lora_rlhf.core.logs import close_logger, stage_logger
from lora_rlhf.recipe.config import Recipe

ADAPTER = "default"  # PEFT's own name: Trainer checkpoints then reload with no renaming
log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint folder
# Defaults both TRL-trained stages share (logging, length, one rolling checkpoint, no tracker); each stage adds its
# own, and the recipe's section overrides any of them.
COMMON_DEFAULTS: dict[str, Any] = {
    "logging_steps": 5,
    "max_length": 512,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 1,
    "report_to": "none",
}


def trainer_args(recipe: Recipe, section: str, defaults: dict[str, Any], out: Path,
                 eval_present: bool) -> dict[str, Any]:
    """Keyword arguments for TRL's SFTConfig / RewardConfig: our defaults, then the recipe's `section`, then what
    follows from the recipe (precision from the compute dtype, gradient checkpointing, output folder, seed)."""
    device = resolve_device(recipe.model)
    dtype = compute_dtype(recipe.model, device)
    args = {**COMMON_DEFAULTS, **defaults, **recipe.trainer_args.get(section, {})}
    if eval_present:
        args.setdefault("eval_strategy", "epoch")
    args.setdefault("gradient_checkpointing", recipe.model.gradient_checkpointing)
    # Mixed precision exactly when the base computes in that dtype on a GPU; the CPU computes in the base's dtype.
    args.setdefault("bf16", device.type == "cuda" and dtype == torch.bfloat16)
    args.setdefault("fp16", device.type == "cuda" and dtype == torch.float16)
    return {"output_dir": str(out / CHECKPOINTS), "seed": recipe.seed, "use_cpu": device.type == "cpu", **args}


def last_checkpoint(out: Path) -> str | None:
    """The newest COMPLETE Trainer checkpoint under OUT/<stage>/checkpoints, or None.

    A kill (or a full disk) while the Trainer saves leaves a `checkpoint-N` without `trainer_state.json`, which
    it writes last; resuming from it fails. Such folders are skipped with a warning that says which and why.
    """
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return None
    steps = []
    for path in folder.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            steps.append((int(match.group(1)), path))
    for _, path in sorted(steps, reverse=True):
        if (path / TRAINER_STATE).is_file():
            return str(path)
        log.warning("skipping %s: it has no %s, so its save was interrupted; resuming from an older checkpoint",
                    path, TRAINER_STATE)
    return None


@contextmanager
def output_folder(out: Path, resume: bool) -> Iterator[None]:
    """`out`, ready for a run, for the duration of the `with` block.

    A fresh run over a FINISHED run never destroys it before it has something to replace it with: the old run is
    renamed to OUT/<stage>.previous, put back if the new run fails, and deleted only once the new run has
    finished. After a kill in between, the next start puts it back first. A resumed (or unfinished) folder loses
    its completion marker first, so a crash never leaves an old "complete" folder mixed with new files.
    """
    previous = out.with_name(out.name + ".previous")
    if previous.is_dir() and not (out / META_FILE).is_file():  # an earlier replacement was killed half-way
        shutil.rmtree(out, ignore_errors=True)
        previous.rename(out)
    kept = not resume and (out / META_FILE).is_file()
    if kept:
        out.rename(previous)
    elif out.exists():
        (out / META_FILE).unlink(missing_ok=True)
        if not resume:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if kept:
            shutil.rmtree(out, ignore_errors=True)
            previous.rename(out)
            log.warning("the new run failed: the previous finished run in %s is back in place", out)
        raise
    if kept:
        shutil.rmtree(previous, ignore_errors=True)


@contextmanager
def stage_log(out: Path, stage: str) -> Iterator[Any]:
    """The stage's train.log, closed whatever happens (an interrupted run must not leak the file handle)."""
    log = stage_logger(out, stage)
    try:
        yield log
    finally:
        close_logger(log)


def loss_summary(history: list[dict[str, Any]]) -> dict[str, float]:
    """first/last logged training loss from a LogCallback's history (empty when nothing was logged)."""
    losses = [r["loss"] for r in history if "loss" in r]
    return {"first_logged_loss": losses[0], "last_logged_loss": losses[-1]} if losses else {}
