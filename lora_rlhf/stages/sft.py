"""Step 1: supervised fine-tuning on demonstrations (prompt -> response) with a LoRA/QLoRA adapter.

setup (validate data, load the shared base, attach the adapter) -> train with trl.SFTTrainer -> save.
The paper trained 16 epochs with a cosine schedule and dropout 0.2 on ~13k demonstrations; with LoRA on a
small set, 1-3 epochs are usually enough, so the recipe decides (`sft.num_train_epochs`, `lora.dropout`).

Output (docs/FORMATS.md): the adapter in plain PEFT format, tokenizer, recipe.yaml, metrics.json, train.log;
`lora_rlhf.json` is written last, so an interrupted run never looks complete. Checkpoints go to
`OUT/sft/checkpoints/` and `resume=True` continues from the newest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lora_rlhf.core import distributed
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.data import load_sft_data
from lora_rlhf.core.loading import load_tokenizer
from lora_rlhf.core.logs import LogCallback, write_metrics
from lora_rlhf.core.text import as_chat_turns, longest_sft_row
from lora_rlhf.hub.client import local_adapter
from lora_rlhf.recipe.config import Recipe, save_recipe
from lora_rlhf.stages.memory import check_memory
from lora_rlhf.stages.trainer_setup import (
    ADAPTER,
    RecipeStepsOnResume,
    last_checkpoint,
    loss_summary,
    stage_outputs,
    trainer_args,
)

# Our defaults where TRL's differ from what a LoRA run on one GPU wants (on top of trainer_setup.COMMON_DEFAULTS);
# every one can be set in `sft:`.
SFT_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1,
    "per_device_train_batch_size": 4,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0,
}


def sft_training_args(recipe: Recipe, out: Path, eval_present: bool):
    from trl import SFTConfig

    return SFTConfig(**trainer_args(recipe, "sft", SFT_DEFAULTS, out, eval_present))


def run_sft(recipe: Recipe, resume: bool = False) -> Path:
    """Train the SFT adapter described by `recipe`; return its output folder."""
    return train_sft(recipe, resume)[0]


def train_sft(recipe: Recipe, resume: bool = False) -> tuple[Path, SharedBase]:
    """`run_sft`, also returning the shared base with the trained adapter (for callers that keep going)."""
    out = recipe.stage_dir("sft")
    distributed.configure(recipe)
    # --- setup: everything that can fail on user input fails here, before anything is written
    train, held_out = load_sft_data(recipe.data.sft, recipe.seed)
    tokenizer = load_tokenizer(recipe.model)
    train = as_chat_turns(train, tokenizer)  # the context generation gives, not TRL's plain-text join
    held_out = as_chat_turns(held_out, tokenizer) if held_out is not None else None
    memory = check_memory(recipe, "sft", sequence_length=longest_sft_row(tokenizer, train))
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
        metrics = {**_train(recipe, shared, train, held_out, out, checkpoint, log), **memory.metrics()}
        # --- save (rank 0): adapter + tokenizer + metadata last
        if main:
            write_metrics(out, metrics)
            shared.save_adapter(ADAPTER, out, stage="sft")
        log.info("SFT done: %s", {k: metrics[k] for k in ("train_loss", "wall_seconds", "memory/peak_gb",
                                                           "memory/predicted_gb") if k in metrics})
    return out, shared


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
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics: dict[str, Any] = {**result.metrics, "wall_seconds": time.perf_counter() - started,
                               "train_rows": len(train), "world_size": distributed.world_size(),
                               **loss_summary(callback.history)}
    if held_out is not None:
        metrics.update(callback.final_eval(trainer))
        metrics["eval_rows"] = len(held_out)
    return metrics
