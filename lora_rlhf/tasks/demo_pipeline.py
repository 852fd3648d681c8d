"""The demo's `data` stage: write every dataset the demo recipe names, offline, from the embedded model.

Named in recipes/demo_smollm2_cpu.yaml as `pipeline.data_builder: lora_rlhf.tasks.demo_pipeline:build_data`.
The prompts and general text come from `demo_data.build`; the SFT demonstrations are the toolkit's own:
best-of-n samples of the bare base, ranked by the IFEval-lite checker (the paper's labelers wrote
demonstrations by hand; a checker-filtered sample is the offline stand-in). Demonstration prompts are kept
apart from the prompts that compare and PPO see, as the paper kept its SFT, RM and PPO prompt sets apart.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from lora_rlhf.errors import RecipeError
from lora_rlhf.recipe.config import Recipe
from lora_rlhf.tasks import demo_data


def _target(recipe: Recipe, key: str) -> Path:
    spec = getattr(recipe.data, key)
    if spec is None:
        raise RecipeError([f"the demo data builder writes data.{key}, but the recipe has no data.{key}.path"])
    return Path(spec.path)


def build_data(recipe: Recipe, n_demos: int = 64, n_train: int = 128, n_eval: int = 48, n_ptx: int = 256,
               n_general: int = 64, samples_per_prompt: int = 4, max_new_tokens: int = 64,
               batch_size: int = 16, constraint_types: list[str] | None = None) -> dict[str, Any]:
    """Write data.sft, data.prompts, data.eval, data.ptx and eval.general_text; return build statistics.

    `constraint_types` limits every prompt's constraints to these IFEval-lite types (None: all of them).
    """
    if not recipe.eval.general_text:
        raise RecipeError(["the demo data builder writes eval.general_text, but the recipe does not name it"])
    try:
        types = demo_data.check_types(constraint_types)
    except ValueError as e:
        raise RecipeError([f"pipeline.data_builder_args.constraint_types: {e}"]) from None
    targets = {"prompts_eval": _target(recipe, "eval"), "ptx": _target(recipe, "ptx"),
               "general_eval": Path(recipe.eval.general_text)}
    sft_path, prompts_path = _target(recipe, "sft"), _target(recipe, "prompts")
    with tempfile.TemporaryDirectory() as tmp:
        paths = demo_data.build(tmp, seed=recipe.seed, n_train=n_demos + n_train, n_eval=n_eval, n_ptx=n_ptx,
                                n_general=n_general, types=types)
        train = [row for _, row in read_jsonl(paths["prompts_train"])]
        demo_rows, rl_rows = train[:n_demos], train[n_demos:]
        for name, target in targets.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(paths[name], target)
    write_jsonl_atomic(prompts_path, rl_rows)
    shared = SharedBase.load(recipe.model, recipe.quantization, for_training=False)
    torch.manual_seed(recipe.seed)  # the demonstrations follow from the recipe's seed, not from whatever ran before
    demos = demo_data.build_demonstrations(shared, [r["prompt"] for r in demo_rows], n=samples_per_prompt,
                                           max_new_tokens=max_new_tokens, batch_size=batch_size)
    sft_path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(sft_path, [{"prompt": d["prompt"], "completion": d["completion"]} for d in demos])
    stats = demo_data.demonstration_stats(demos, len(demo_rows))
    write_json_atomic(sft_path.parent / "demonstrations_stats.json", stats)
    return stats
