"""What the two TRL-trained stages (sft, reward) share: Trainer arguments, the output folder, checkpoints, and
the loss summary, so that both behave alike on resume, interruption and precision."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lora_rlhf.core import distributed
from lora_rlhf.core.adapters import META_FILE
from lora_rlhf.core.io import disk_full, remove_temp_files, writing
from lora_rlhf.core.loading import compute_dtype, resolve_device
from lora_rlhf.core.logs import close_logger, stage_logger
from lora_rlhf.errors import StorageError
from lora_rlhf.recipe.config import Recipe

ADAPTER = "default"  # PEFT's own name: Trainer checkpoints then reload with no renaming
log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint folder
WHAT_RANK_0_DOES = {"reward": ", reloads the reward model on the causal base, checks it, scores the demonstrations"}
STEP_KINDS = ("logging", "eval", "save")  # the Trainer's *_steps that a checkpoint's state overrides on resume


def trainer_args(recipe: Recipe, section: str, out: Path, eval_present: bool) -> dict[str, Any]:
    """Keyword arguments for TRL's SFTConfig / RewardConfig / DPOConfig: the recipe's resolved `section` (our
    defaults under the user's values: recipe/config.TRAINER_DEFAULTS), then what is derived when the stage runs."""
    device = resolve_device(recipe.model)
    dtype = compute_dtype(recipe.model, device)
    args = dict(recipe.trainer_args[section])
    # Derived here, not stored in the recipe: these follow from the data, from other settings or from the machine.
    if eval_present:
        args.setdefault("eval_strategy", "epoch")
    args["gradient_checkpointing"] = recipe.gradient_checkpointing(section)
    if args["gradient_checkpointing"]:
        # Reentrant checkpointing re-runs the forward outside autograd: under DDP it marks parameters ready twice.
        args.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    # Mixed precision exactly when the base computes in that dtype on a GPU; the CPU computes in the base's dtype.
    args.setdefault("bf16", device.type == "cuda" and dtype == torch.bfloat16)
    args.setdefault("fp16", device.type == "cuda" and dtype == torch.float16)
    return {"output_dir": str(out / CHECKPOINTS), "seed": recipe.seed, "use_cpu": device.type == "cpu", **args}


def run_trainer(trainer: Any, checkpoint: str | None) -> Any:
    """`trainer.train()` from `checkpoint` (None: from the start). What the Trainer writes is its checkpoints, so a
    full disk inside is raised as OSError(ENOSPC) naming that folder (core.io.writing), whichever library failed."""
    with writing(trainer.args.output_dir):
        return trainer.train(resume_from_checkpoint=checkpoint)


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
        if _readable_state(path / TRAINER_STATE):
            return str(path)
        log.warning("skipping %s: it has no complete %s, so its save was interrupted; resuming from an older "
                    "checkpoint", path, TRAINER_STATE)
    return None


def _readable_state(path: Path) -> bool:
    # The Trainer writes trainer_state.json in place, not atomically: a kill during that write leaves it cut short.
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


class RecipeStepsOnResume(TrainerCallback):
    """Resuming, the Trainer takes logging/eval/save steps from the checkpoint's state and only warns when the
    recipe asks for others (a run resumed with a smaller save_steps then wrote no checkpoint at all). This puts
    the recipe's values back, once the checkpoint's state is loaded, and logs each change with both values."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        before = {kind: getattr(state, f"{kind}_steps") for kind in STEP_KINDS}
        state.compute_steps(args, state.max_steps)
        for kind, old in before.items():
            new = getattr(state, f"{kind}_steps")
            if new != old:
                for logger in (self.logger, log):  # train.log, and the console
                    logger.warning("%s_steps is %s in the checkpoint and %s in the recipe: continuing with %s",
                                   kind, old, new, new)


@contextmanager
def output_folder(out: Path, resume: bool) -> Iterator[None]:
    """`out`, ready for a run, for the duration of the `with` block.

    A fresh run over a FINISHED run never destroys it before it has something to replace it with: the old run is
    renamed to OUT/<stage>.previous, put back if the new run fails, and deleted only once the new run has
    finished. After a kill in between, the next fresh start puts it back first, while a `--resume` continues the
    interrupted new run and keeps the old one until it finishes. A resumed (or unfinished) folder loses its
    completion marker first, so a crash never leaves an old "complete" folder mixed with new files.
    """
    previous = out.with_name(out.name + ".previous")
    if previous.is_dir():
        if (out / META_FILE).is_file():  # the replacement had finished; only deleting the old run was cut short
            shutil.rmtree(previous)
        elif not resume:  # a replacement was killed half-way: start again from the finished run
            shutil.rmtree(out, ignore_errors=True)
            previous.rename(out)
    replacing = previous.is_dir()  # resuming a killed replacement: its checkpoints are in `out`
    kept = not resume and (out / META_FILE).is_file()
    if kept:
        out.rename(previous)
    elif out.exists():
        (out / META_FILE).unlink(missing_ok=True)
        remove_temp_files(out)  # a save killed half-way (safetensors' .tmpXXXXXX): not part of this run
        if not resume:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)  # inside: a full disk here must put the finished run back too
        yield
    except BaseException as e:
        if kept:
            shutil.rmtree(out, ignore_errors=True)
            previous.rename(out)
            log.warning("the new run failed: the previous finished run in %s is back in place", out)
        if isinstance(e, Exception) and disk_full(e, out):  # safetensors, torch.save, tokenizers: no errno
            kept_note = ("; the previous finished run is back in place" if kept
                         else f"; the previous finished run is kept in {previous}" if replacing else "")
            resume_note = "" if kept else f"; --resume continues from the newest complete checkpoint in {out / CHECKPOINTS}"
            what = (getattr(e, "filename", None) or getattr(e, "strerror", None)
                    or f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}")
            raise StorageError(f"no space left on the device while writing {out} ({what}): the "
                               f"run stopped and nothing was marked complete{kept_note}",
                               fix=f"free space on that disk (or set output_dir to another one), then rerun{resume_note}"
                               ) from e
        raise
    if kept or replacing:
        shutil.rmtree(previous, ignore_errors=True)


@contextmanager
def stage_outputs(out: Path, stage: str, resume: bool) -> Iterator[tuple[Any, bool]]:
    """`output_folder` + `stage_log` on rank 0, which alone writes; yields (logger, is_main).

    Under a launcher the other ranks train alongside (the Trainer syncs them) and get a silent logger; they
    leave the block once rank 0 has written everything, so a next stage on any rank finds its inputs.
    """
    end = f"the end of the {stage} stage (rank 0 writes its outputs{WHAT_RANK_0_DOES.get(stage, '')})"
    if not distributed.is_main():
        yield logging.getLogger(f"lora_rlhf.{stage}.rank{distributed.rank()}.silent"), False
        distributed.barrier(end)
        return
    with output_folder(out, resume), stage_log(out, stage) as logger:
        logger.info("%s: %s", stage, distributed.describe())
        yield logger, True
    distributed.barrier(end)


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
