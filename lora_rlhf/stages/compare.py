"""Step 2a: sample K responses per prompt and (optionally) rank them -> candidates.jsonl, rankings.jsonl.

The paper's labelers ranked K = 4..9 responses to each prompt, sampled from earlier models. Here the
responses come from the base + the SFT adapter (default `OUT/sft` when it is complete, else the bare base, or
`compare.adapter`), and a labeler - a `module:function` or a reward adapter (lora_rlhf/stages/labelers.py) - stands in
for the people. Without a labeler, `candidates.jsonl` is what people rank (docs/FORMATS.md, Rankings).

Everything that can fail on user input (prompts, adapter, labeler) fails before sampling; each batch is labeled
as soon as it is sampled, so a broken labeler stops the run on the first batch. Files are written at the end,
atomically: an interrupted run leaves no half-written candidates. A rerun never deletes rankings (they can be
people's work, written by `lora-rlhf label`): an earlier run's rankings.jsonl moves, with its candidates and
recipe, to OUT/compare/previous-N/ before anything new is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_rlhf.core import distributed
from lora_rlhf.core.adapters import recipe_adapter
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.data import check_text_or_messages, load_table, require_columns
from lora_rlhf.core.generation import generate_responses
from lora_rlhf.core.io import keep_previous, write_jsonl_atomic
from lora_rlhf.core.loading import load_tokenizer
from lora_rlhf.core.text import longest_prompt
from lora_rlhf.errors import DataError
from lora_rlhf.hub.client import local_adapter
from lora_rlhf.recipe.config import Recipe, save_recipe
from lora_rlhf.stages.labelers import load_labeler
from lora_rlhf.stages.memory import check_memory
from lora_rlhf.stages.stage import StageResult

CANDIDATES = "candidates.jsonl"
RANKINGS = "rankings.jsonl"
log = logging.getLogger(__name__)


def load_prompt_rows(recipe: Recipe) -> list[dict[str, Any]]:
    """data.prompts -> rows with a unique `id` and a `prompt`; other keys are carried along."""
    cfg = recipe.data.prompts
    if cfg is None:
        raise DataError("the recipe has no data.prompts section, so compare has nothing to answer",
                        fix="add `data: {prompts: {path: prompts.jsonl}}` with a `prompt` column")
    ds = load_table(cfg, recipe.seed, what="prompts dataset")
    require_columns(ds, {"prompt": ("prompt",)}, "prompts dataset", cfg.path)
    check_text_or_messages(ds, "prompt", cfg.path)
    rows = []
    for i, row in enumerate(ds.to_list()):
        row = {k: v for k, v in row.items() if v is not None}
        row["id"] = str(row["id"]) if "id" in row else f"p{i:05d}"
        rows.append({"id": row.pop("id"), "prompt": row.pop("prompt"), **row})
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            raise DataError(f"prompts dataset '{cfg.path}': id '{row['id']}' occurs twice",
                            fix="make the `id` column unique, or drop it (ids are then p00000, p00001, ...)")
        seen.add(row["id"])
    return rows


def run_compare(recipe: Recipe, progress: bool = True) -> Path:
    """Sample recipe.compare.k responses per prompt; write OUT/compare/candidates.jsonl (+ rankings.jsonl)."""
    return run(recipe, progress=progress).output


def is_complete(recipe: Recipe) -> bool:
    """Rankings are what the next stage (reward) learns from: candidates alone are not complete."""
    return (recipe.stage_dir("compare") / RANKINGS).is_file()


def pipeline_problems(recipe: Recipe) -> list[str]:
    """In a pipeline nobody ranks the candidates by hand: compare needs a labeler."""
    if recipe.compare.labeler:
        return []
    return ["pipeline stage 'compare' needs compare.labeler to rank the samples without people (fix: set it to a "
            "`module:function` or a reward adapter, or label OUT/compare/candidates.jsonl with `lora-rlhf label` "
            "and set data.reward)"]


def run(recipe: Recipe, *, resume: bool | None = None, progress: bool = True) -> StageResult:
    """The stage (stages/stage.py): `run_compare`; metrics: how many prompts were sampled and ranked."""
    cfg = recipe.compare
    out = recipe.stage_dir("compare")
    distributed.configure(recipe)
    # --- setup: validate prompts, load base + sampling adapter + labeler before sampling anything
    rows = load_prompt_rows(recipe)
    tokenizer = load_tokenizer(recipe.model)
    check_memory(recipe, "compare", prompt_length=longest_prompt(tokenizer, [r["prompt"] for r in rows]))
    shared = SharedBase.load(recipe.model, recipe.quantization, for_training=False, tokenizer=tokenizer)
    # compare.adapter, else OUT/sft when that stage finished, else the bare base
    adapter = recipe_adapter(recipe, "sft", recipe.compare.adapter)
    role = None
    if adapter is not None:
        shared.load_adapter("policy", local_adapter(adapter), trainable=False)
        role = "policy"
    judge = load_labeler(cfg.labeler, shared) if cfg.labeler else None
    torch.manual_seed(recipe.seed)  # the samples follow from the recipe's seed, not from whatever ran before
    # --- sample (and label) batch by batch; under a launcher each rank takes its contiguous share of the prompts
    mine = [rows[i] for i in distributed.shard(len(rows))]
    candidates, rankings = [], []
    with _progress(len(mine), enabled=progress and distributed.is_main()) as advance:
        for start in range(0, len(mine), cfg.batch_size):
            chunk = mine[start:start + cfg.batch_size]
            responses = generate_responses(
                shared, [r["prompt"] for r in chunk], role=role, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_p=cfg.top_p, num_return_sequences=cfg.k, batch_size=cfg.batch_size)
            for row, answers in zip(chunk, responses, strict=True):
                line = {"id": row["id"], "prompt": row["prompt"], "responses": answers,
                        **{k: v for k, v in row.items() if k not in ("id", "prompt")}}
                candidates.append(line)
                if judge is not None:
                    rankings.append({**line, **judge(row["prompt"], answers), "labeler": cfg.labeler})
            advance(len(chunk))
    candidates, rankings = distributed.gather_shards(candidates), distributed.gather_shards(rankings)
    # --- save (rank 0): whole files, atomically. rankings.jsonl marks the stage complete: an earlier run's must
    # not stand beside this run's candidates and recipe, were this save cut short (or this run has no labeler),
    # and it must not be lost either: it moves to previous-N first.
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        kept = keep_previous(out, RANKINGS, (CANDIDATES, "recipe.yaml"))
        if kept is not None:
            log.warning("compare: the earlier run's %s (with its candidates and recipe) moved to %s: nothing is "
                        "deleted; point data.reward.path at %s to train on it", RANKINGS, kept, kept / RANKINGS)
        save_recipe(recipe, out / "recipe.yaml")
        write_jsonl_atomic(out / CANDIDATES, candidates)
        if judge is not None:
            write_jsonl_atomic(out / RANKINGS, rankings)
    distributed.barrier("the end of compare (rank 0 writes the candidates and rankings)")
    return StageResult("compare", out, {"prompts": len(candidates), "responses_per_prompt": cfg.k,
                                        "ranked_prompts": len(rankings), "labeler": cfg.labeler})


class _progress:
    """Progress over prompts with ETA: a rich bar on a terminal, one line per batch in a log (a bar redrawn
    with carriage returns is unreadable there). `advance(n)` moves it; disabled, a no-op."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled, self.bar = total, enabled, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True)
        if not console.is_terminal:
            return self._lines()
        self.bar = Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), console=console)
        self.bar.start()
        task = self.bar.add_task("prompts", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def _lines(self) -> Callable[[int], None]:
        import sys
        import time

        started, done = time.monotonic(), 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            elapsed = time.monotonic() - started
            eta = elapsed / done * (self.total - done)
            print(f"sampled {done}/{self.total} prompts, {elapsed:.0f}s elapsed, ETA {eta:.0f}s",
                  file=sys.stderr, flush=True)

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
