"""The pipeline's `data` stage: the datasets the recipe names are the user's own files, or those that
`pipeline.data_builder` writes (the demo's, lora_rlhf.tasks.demo_pipeline)."""

from __future__ import annotations

from pathlib import Path

from lora_rlhf.core import distributed
from lora_rlhf.core.plugins import load_callable
from lora_rlhf.recipe.config import Recipe
from lora_rlhf.stages.stage import StageResult

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # a dataset path with another suffix is a Hub id


def run(recipe: Recipe, *, resume: bool | None = None) -> StageResult:
    """Write the recipe's datasets with pipeline.data_builder (rank 0; the others read them after the barrier)."""
    if not recipe.pipeline.data_builder:
        return StageResult("data", None)  # the datasets are the user's own files; each stage validates what it reads
    builder = load_callable(recipe.pipeline.data_builder, "pipeline.data_builder")
    if distributed.is_main():
        builder(recipe, **recipe.pipeline.data_builder_args)
    distributed.barrier("the end of the data stage (rank 0 builds the datasets)")
    return StageResult("data", Path(recipe.output_dir) / "data")


def is_complete(recipe: Recipe) -> bool:
    """Every local dataset file the recipe names exists."""
    specs = [getattr(recipe.data, f) for f in ("sft", "prompts", "ptx", "eval", "reward")]
    return all(Path(s.path).is_file() for s in specs
               if s is not None and Path(s.path).suffix.lower() in LOCAL_SUFFIXES)
