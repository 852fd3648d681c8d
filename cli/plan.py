"""`lora-rlhf plan RECIPE.yaml [--gpu 24GB | --gpu auto]`: predicted peak memory of every stage, before loading."""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Annotated

import typer

from lora_rlhf_cli._common import RecipeArg, SetOpt, handle_errors

_UNITS = {"": None, "b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30,
          "tb": 2**40, "tib": 2**40}


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def parse_size(text: str) -> int:
    """'24GB' / '24 GiB' / '80G' / '16000MB' -> bytes. GB is read as GiB: GPUs are sold by binary sizes
    (a "24 GB" card has 24 GiB). A number without a unit is refused: 24 what?"""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    unit = unit + "b" if unit in ("k", "m", "g", "t") else unit
    if not match or unit not in _UNITS or _UNITS[unit] is None:
        raise typer.BadParameter(f"'{text}' is not a memory size with a unit: write e.g. 24GB, 80GiB, 16000MB, "
                                 "or auto (this machine's device)", param_hint="--gpu")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:  # 0 read as "no capacity given": the plan printed no verdicts at all
        raise typer.BadParameter(f"'{text}' is no memory: give the device's size, e.g. 24GB", param_hint="--gpu")
    return size


@handle_errors
def command(
    recipe: RecipeArg,
    set_: SetOpt = None,
    gpu: Annotated[str | None, typer.Option(
        "--gpu", help="Memory to check against: a size (24GB, 80GiB) or auto (the visible device).")] = None,
    device: Annotated[Device | None, typer.Option(
        help="Plan for this device (default: cuda with a --gpu size, else the recipe's / this machine's).")] = None,
    stage: Annotated[list[str] | None, typer.Option(
        "--stage", help="Plan only these stages (sft, compare, reward, dpo, ppo, ppo-ptx, eval); default: the pipeline's.")
    ] = None,
    prompt_length: Annotated[int, typer.Option(min=1, help="Prompt tokens to assume (PPO plans at most ppo.max_prompt_length).")
                             ] = 128,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (bytes).")] = False,
) -> None:
    """Predict each stage's peak memory from the recipe and the model's config.json (nothing is loaded), with a
    verdict against --gpu and, when a stage does not fit, the ranked --set lines that would make it fit."""
    from rich.console import Console

    from lora_rlhf.plan.model_shape import load_shape
    from lora_rlhf.plan.recipe_plan import PLANNED_STAGES, PlanContext
    from lora_rlhf.plan.report import build_plan, plan_dict, render
    from lora_rlhf.recipe.config import load_recipe

    capacity = parse_size(gpu) if gpu and gpu != "auto" else None
    bad = [s for s in stage or [] if s not in PLANNED_STAGES]
    if bad:
        raise typer.BadParameter(f"unknown stage {bad[0]!r}: choose from {', '.join(PLANNED_STAGES)}",
                                 param_hint="--stage")
    cfg = load_recipe(recipe, set_ or [])
    target = device.value if device else _default_device(cfg.model.device, gpu)
    if gpu == "auto":
        capacity = _auto_capacity(target)
    ctx = PlanContext(device=target, prompt_length=prompt_length)
    shape = load_shape(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code)
    if prompt_length >= shape.max_position_embeddings:
        raise typer.BadParameter(f"{prompt_length} tokens leave no room for an answer in {shape.name}'s context of "
                                 f"{shape.max_position_embeddings} tokens: plan a prompt length below it",
                                 param_hint="--prompt-length")
    plans = build_plan(cfg, ctx, shape, capacity, stage or None)
    if as_json:
        typer.echo(json.dumps(plan_dict(plans, shape, ctx, capacity), indent=2))
    else:
        render(plans, shape, ctx, capacity, Console(width=160))


def _default_device(recipe_device: str, gpu: str | None) -> str:
    if recipe_device in ("cpu", "cuda"):
        return recipe_device
    if gpu and gpu != "auto":
        return "cuda"  # a GPU size was given: plan for a GPU
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _auto_capacity(target: str) -> int:
    import torch

    from lora_rlhf.plan.preflight import total_bytes

    if target == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--gpu auto needs a visible CUDA GPU: give a size instead, e.g. --gpu 24GB",
                                 param_hint="--gpu")
    return total_bytes(torch.device(target))
