"""docs/planner.md's tables: the shipped recipes, and 1B / 3B / 7-8B / 70B bases on 16 / 24 / 48 / 80 GB GPUs.

    python -m lora_rlhf.plan.table            # prints Markdown

Every base is planned with the 8B recipe's settings (recipes/llama3_8b_qlora_1gpu.yaml: QLoRA NF4, r=16,
gradient checkpointing, bf16, batch sizes and lengths as written) with only `model.name` changed; where a stage
does not fit, the planner's first-ranked knobs that do are named. These are predictions for CUDA.
"""

from __future__ import annotations

from pathlib import Path

from lora_rlhf.plan.advice import advise
from lora_rlhf.plan.model_shape import load_shape
from lora_rlhf.plan.recipe_plan import PlanContext, plan_recipe, recipe_stages
from lora_rlhf.recipe.config import Recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
BASES = {"1B": "meta-llama/Llama-3.2-1B-Instruct", "3B": "meta-llama/Llama-3.2-3B-Instruct",
         "7B": "meta-llama/Llama-2-7b-hf", "8B": "meta-llama/Llama-3.1-8B-Instruct",
         "70B": "meta-llama/Llama-3.1-70B-Instruct"}
GPUS_GB = (16, 24, 48, 80)


def recipe_table() -> list[str]:
    lines = ["| recipe | device | stage peaks (GB) |", "|---|---|---|"]
    for path in sorted(RECIPES.glob("*.yaml")):
        recipe = load_recipe(path)
        device = "cuda" if recipe.model.device == "cuda" else "cpu"
        peaks = ", ".join(f"{e.stage} {e.peak / 2**30:.1f}" for e in plan_recipe(recipe, PlanContext(device)))
        lines.append(f"| `recipes/{path.name}` | {device} | {peaks} |")
    return lines


def base_tables(recipe: Recipe) -> list[str]:
    ctx = PlanContext("cuda")
    stages = recipe_stages(recipe)
    peaks = ["| base | params | " + " | ".join(stages) + " |", "|---|---|" + "---|" * len(stages)]
    fits = ["| base | " + " | ".join(f"{g} GB" for g in GPUS_GB) + " |", "|---|" + "---|" * len(GPUS_GB)]
    for label, name in BASES.items():
        recipe.model.name = name
        shape = load_shape(name)
        estimates = plan_recipe(recipe, ctx, stages, shape)
        peaks.append(f"| {label} `{name}` | {shape.total_params() / 1e9:.1f}B | "
                     + " | ".join(f"{e.peak / 2**30:.1f}" for e in estimates) + " |")
        cells = []
        for gb in GPUS_GB:
            capacity = gb * 2**30
            over = [e for e in estimates if e.peak > capacity]
            if not over:
                cells.append("all stages")
                continue
            fixes = []
            for e in over:
                knobs = [k for k in advise(recipe, e.stage, shape, ctx, capacity) if k.peak <= capacity]
                fixes.append(f"{e.stage}: `{' '.join(knobs[0].sets)}`" if knobs else f"{e.stage}: no")
            cells.append("; ".join(fixes))
        fits.append(f"| {label} | " + " | ".join(cells) + " |")
    return peaks + [""] + fits


def main() -> None:
    print("Shipped recipes, predicted peak per stage (`lora-rlhf plan RECIPE`):\n")
    print("\n".join(recipe_table()))
    recipe = load_recipe(RECIPES / "llama3_8b_qlora_1gpu.yaml")
    print("\nBases with the 8B recipe's settings, predicted peak per stage in GB on CUDA "
          "(`lora-rlhf plan recipes/llama3_8b_qlora_1gpu.yaml --set model.name=ID`):\n")
    print("\n".join(base_tables(recipe)))


if __name__ == "__main__":
    main()
