"""Step 1: supervised fine-tuning on demonstrations (prompt -> response) with a LoRA/QLoRA adapter.

setup (validate data, load the shared base, attach the adapter) -> train with trl.SFTTrainer -> save.
The paper trained 16 epochs with a cosine schedule and dropout 0.2 on ~13k demonstrations; with LoRA on a
small set, 1-3 epochs are usually enough, so the recipe decides (`sft.num_train_epochs`, `lora.dropout`).

Rows longer than `sft.max_length` tokens are cut or dropped as `sft.long_rows` says, before the model loads;
how many is logged and kept in metrics.json (TRL alone drops some of them without a word), and when no row is
left the stage stops with one DataError.

Output (docs/FORMATS.md): the adapter in plain PEFT format, tokenizer, recipe.yaml, metrics.json, train.log;
`lora_rlhf.json` is written last, so an interrupted run never looks complete. Checkpoints go to
`OUT/sft/checkpoints/` and `resume=True` continues from the newest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_rlhf.core import distributed
from lora_rlhf.core.adapters import is_finished
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.data import load_sft_data
from lora_rlhf.core.loading import load_tokenizer
from lora_rlhf.core.logs import LogCallback, write_metrics
from lora_rlhf.core.text import as_chat_turns, longest_sft_row, sft_row_lengths
from lora_rlhf.errors import DataError
from lora_rlhf.hub.client import local_adapter
from lora_rlhf.recipe.config import Recipe, save_recipe
from lora_rlhf.stages.memory import check_memory
from lora_rlhf.stages.stage import StageResult
from lora_rlhf.stages.trainer_setup import (
    ADAPTER,
    RecipeStepsOnResume,
    last_checkpoint,
    loss_summary,
    run_trainer,
    stage_outputs,
    trainer_args,
)

log_console = logging.getLogger(__name__)


def sft_training_args(recipe: Recipe, out: Path, eval_present: bool):
    from trl import SFTConfig

    return SFTConfig(**trainer_args(recipe, "sft", out, eval_present))


@dataclass
class LongRows:
    """What `fit_rows` did to the rows longer than max_length (counts), and the longest row left (tokens)."""

    mode: str
    max_length: int | None
    too_long: int = 0
    truncated: int = 0
    dropped: int = 0
    longest: int = 0

    def metrics(self, prefix: str = "") -> dict[str, Any]:
        return {f"{prefix}rows_longer_than_max_length": self.too_long, f"{prefix}rows_truncated": self.truncated,
                f"{prefix}rows_dropped_too_long": self.dropped}

    def describe(self, what: str) -> str:
        return (f"{self.too_long} {what} row(s) are longer than sft.max_length={self.max_length} tokens: "
                f"{self.truncated} cut to it (the end of the answer is not trained), {self.dropped} dropped "
                f"(sft.long_rows: {self.mode})")


def fit_rows(rows: Any, tokenizer: Any, args: dict[str, Any], mode: str, what: str) -> tuple[Any, LongRows]:
    """SFT rows (a `datasets.Dataset`, after `as_chat_turns`) as TRL will train them at `args["max_length"]`.

    `truncate` leaves a long row to TRL, which cuts it at max_length (`truncation_mode` keep_start) and drops it
    when its prompt alone fills max_length (no answer token is left to learn from): such rows are dropped here,
    so that they are counted. `drop` drops every row longer than max_length. Packed rows are split across
    sequences, never cut. Raises DataError when no row is left. Every row is tokenised once (~1 ms a row).
    """
    max_length = args.get("max_length")
    if max_length is None or args.get("packing"):
        return rows, LongRows(mode, max_length, longest=longest_sft_row(tokenizer, rows))
    # TRL leaves the prompt out of the loss unless told otherwise; keep_end cuts the prompt instead of the answer.
    prompt_masked = args.get("completion_only_loss") is not False and args.get("truncation_mode") != "keep_end"
    keep, stats, shortest = [], LongRows(mode, max_length), None
    for i, row in enumerate(rows):
        tokens, prompt = sft_row_lengths(tokenizer, row)
        shortest = tokens if shortest is None else min(shortest, tokens)
        if tokens > max_length:
            stats.too_long += 1
            if mode == "drop" or (prompt_masked and prompt >= max_length):
                stats.dropped += 1
                continue
            stats.truncated += 1
        keep.append(i)
        stats.longest = max(stats.longest, min(tokens, max_length))
    if not keep:
        cause = "are longer than" if mode == "drop" else "have a prompt at least as long as"
        fix = ("raise sft.max_length above the longest prompt, or shorten the prompts" if mode == "truncate" else
               "raise sft.max_length, shorten the rows, or set sft.long_rows: truncate to train their beginnings")
        raise DataError(f"all {len(rows)} {what} rows {cause} sft.max_length={max_length} tokens (the shortest row "
                        f"has {shortest}), so nothing is left to train on", fix=fix)
    return (rows.select(keep) if len(keep) < len(rows) else rows), stats


def run(recipe: Recipe, *, resume: bool | None = None) -> StageResult:
    """The stage (stages/stage.py): train the SFT adapter described by `recipe` into OUT/sft."""
    return _train_sft(recipe, bool(resume))[0]


def is_complete(recipe: Recipe) -> bool:
    return is_finished(recipe.stage_dir("sft"))


def run_sft(recipe: Recipe, resume: bool = False) -> Path:
    """Train the SFT adapter described by `recipe`; return its output folder."""
    return run(recipe, resume=resume).output


def train_sft(recipe: Recipe, resume: bool = False) -> tuple[Path, SharedBase]:
    """`run_sft`, also returning the shared base with the trained adapter (for callers that keep going)."""
    result, shared = _train_sft(recipe, resume)
    return result.output, shared


def _train_sft(recipe: Recipe, resume: bool) -> tuple[StageResult, SharedBase]:
    out = recipe.stage_dir("sft")
    distributed.configure(recipe)
    # --- setup: everything that can fail on user input fails here, before anything is written
    train, held_out = load_sft_data(recipe.data.sft, recipe.seed)
    tokenizer = load_tokenizer(recipe.model)
    train = as_chat_turns(train, tokenizer)  # the context generation gives, not TRL's plain-text join
    held_out = as_chat_turns(held_out, tokenizer) if held_out is not None else None
    args = trainer_args(recipe, "sft", out, held_out is not None)
    train, long_rows = fit_rows(train, tokenizer, args, recipe.sft.long_rows, "SFT")
    held_long = None
    if held_out is not None:
        try:
            held_out, held_long = fit_rows(held_out, tokenizer, args, recipe.sft.long_rows, "held-out SFT")
        except DataError:  # no held-out row fits: train without an eval set rather than fail
            log_console.warning("SFT: every held-out row is longer than sft.max_length=%s tokens: no eval loss",
                                args.get("max_length"))
            held_out = None
    memory = check_memory(recipe, "sft", sequence_length=long_rows.longest)
    shared = SharedBase.load(recipe.model, recipe.quantization, tokenizer=tokenizer)
    torch.manual_seed(recipe.seed)  # a new adapter's init follows from the recipe, not from what ran before it
    if recipe.sft.init_adapter:
        shared.load_adapter(ADAPTER, local_adapter(recipe.sft.init_adapter), trainable=True)
    else:
        shared.add_adapter(ADAPTER, recipe.lora, trainable=True)
    checkpoint = last_checkpoint(out) if resume else None
    with stage_outputs(out, "sft", resume) as (log, main):
        if main:
            save_recipe(recipe, out / "recipe.yaml")
        log.info("SFT: %d train / %d eval rows, base %s (%s), resume from %s", len(train),
                 0 if held_out is None else len(held_out), recipe.model.name, recipe.quantization.mode, checkpoint)
        for stats, what in ((long_rows, "SFT"), (held_long, "held-out SFT")):
            if stats is not None and stats.too_long:
                for logger in (log, log_console):  # train.log, and the console
                    logger.warning(stats.describe(what))
        metrics = {**_train(recipe, shared, train, held_out, out, checkpoint, log), **memory.metrics(),
                   "long_rows": recipe.sft.long_rows, **long_rows.metrics(),
                   **(held_long.metrics("eval_") if held_long is not None else {})}
        # --- save (rank 0): adapter + tokenizer + metadata last
        if main:
            write_metrics(out, metrics)
            shared.save_adapter(ADAPTER, out, stage="sft")
        log.info("SFT done: %s", {k: metrics[k] for k in ("train_loss", "wall_seconds", "memory/peak_gb",
                                                           "memory/predicted_gb") if k in metrics})
    return StageResult("sft", out, metrics), shared


def _train(recipe: Recipe, shared: SharedBase, train: Any, held_out: Any, out: Path, checkpoint: str | None,
           log: Any) -> dict[str, Any]:
    from trl import SFTTrainer

    callback = LogCallback(log)
    trainer = SFTTrainer(
        model=shared.model,
        args=sft_training_args(recipe, out, held_out is not None),
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=shared.tokenizer,
        callbacks=[callback, RecipeStepsOnResume(log)],
    )
    shared.keep_adapters_in_fp32()  # undo TRL's bf16 cast of QLoRA adapters
    # --- train (Ctrl-C propagates: the newest checkpoint stays on disk for --resume)
    started = time.perf_counter()
    result = run_trainer(trainer, checkpoint)
    # train_rows: the rows TRL trained on (its own dataset; packed, the rows before packing)
    trained = len(train) if trainer.args.packing else len(trainer.train_dataset)
    metrics: dict[str, Any] = {**result.metrics, "wall_seconds": time.perf_counter() - started,
                               "train_rows": trained, "world_size": distributed.world_size(),
                               **loss_summary(callback.history)}
    if held_out is not None:
        metrics.update(callback.final_eval(trainer))
        metrics["eval_rows"] = len(held_out) if trainer.args.packing else len(trainer.eval_dataset)
    return metrics
