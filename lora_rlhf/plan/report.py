"""The plan as data (`--json`) and as a table (rich): every stage's peak, its parts, a verdict and the knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_rlhf.plan.advice import Knob, advise
from lora_rlhf.plan.estimate import StageEstimate
from lora_rlhf.plan.model_shape import ModelShape
from lora_rlhf.plan.recipe_plan import PlanContext, plan_recipe
from lora_rlhf.recipe.config import Recipe

TIGHT = 0.9  # a peak above this share of the memory fits on paper but leaves no room for fragmentation


@dataclass
class StagePlan:
    estimate: StageEstimate
    capacity: int | None
    advice: list[Knob] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.capacity is None:
            return ""
        if self.estimate.peak > self.capacity:
            return "does not fit"
        return "fits (tight)" if self.estimate.peak > TIGHT * self.capacity else "fits"


def build_plan(recipe: Recipe, ctx: PlanContext, shape: ModelShape, capacity: int | None,
               stages: list[str] | None = None) -> list[StagePlan]:
    """Estimates for the recipe's stages, with the ranked advice for those over `capacity` (bytes)."""
    plans = []
    for est in plan_recipe(recipe, ctx, stages, shape):
        knobs = advise(recipe, est.stage, shape, ctx, capacity) if capacity and est.peak > capacity else []
        plans.append(StagePlan(est, capacity, knobs))
    return plans


def plan_dict(plans: list[StagePlan], shape: ModelShape, ctx: PlanContext, capacity: int | None) -> dict[str, Any]:
    """The JSON form: bytes everywhere, every phase and part, the verdict and the advice."""
    return {
        "model": shape.name, "params": shape.total_params(), "device": ctx.device, "capacity_bytes": capacity,
        "assumptions": {"prompt_length": ctx.prompt_length,
                        "note": "sequences as long as the recipe allows (max_length, prompt + response_length)"},
        "stages": [{
            "stage": p.estimate.stage, "peak_bytes": p.estimate.peak, "peak_phase": p.estimate.peak_phase.name,
            "verdict": p.verdict or None, "settings": p.estimate.settings,
            "phases": [{"name": ph.name, "total_bytes": ph.total,
                        "parts": [{"name": x.name, "bytes": x.bytes, "note": x.note} for x in ph.parts]}
                       for ph in p.estimate.phases],
            "advice": [{"set": list(k.sets), "set_line": k.set_line, "peak_bytes": k.peak, "effect": k.effect,
                        "fits": capacity is None or k.peak <= capacity} for k in p.advice],
        } for p in plans],
    }


def gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def render(plans: list[StagePlan], shape: ModelShape, ctx: PlanContext, capacity: int | None, console: Any) -> None:
    """Print the summary table, each stage's largest parts, and the advice for stages that do not fit."""
    from rich.table import Table

    where = f"{ctx.device}" + (f", {gb(capacity)}" if capacity else "")
    table = Table(title=f"Predicted peak memory: {shape.name} ({shape.total_params() / 1e9:.2f}B params) on {where}",
                  title_justify="left")
    for col in ("stage", "peak", "in phase", "largest parts", *(["verdict"] if capacity else [])):
        table.add_column(col, justify="right" if col == "peak" else "left")
    for p in plans:
        phase = p.estimate.peak_phase
        top = sorted(phase.parts, key=lambda x: -x.bytes)[:3]
        row = [p.estimate.stage, gb(p.estimate.peak), phase.name,
               ", ".join(f"{x.name} {x.bytes / 2**30:.2f}" for x in top)]
        if capacity:
            color = "red" if p.verdict == "does not fit" else "yellow" if "tight" in p.verdict else "green"
            row.append(f"[{color}]{p.verdict}[/{color}]")
        table.add_row(*row)
    console.print(table)
    for p in plans:
        phase = p.estimate.peak_phase
        console.print(f"\n[bold]{p.estimate.stage}[/bold] peak in {phase.name} "
                      f"({', '.join(f'{ph.name} {ph.total / 2**30:.2f}' for ph in p.estimate.phases)} GB):")
        for x in sorted(phase.parts, key=lambda x: -x.bytes):
            console.print(f"  {x.bytes / 2**30:8.3f} GB  {x.name}" + (f"  [dim]{x.note}[/dim]" if x.note else ""),
                          highlight=False)
        if p.advice:
            console.print(f"  [red]does not fit {gb(capacity or 0)}[/red]; ranked knobs (predicted peak):")
            for k in p.advice:
                mark = "fits" if capacity and k.peak <= capacity else "still over"
                console.print(f"    {k.set_line}   -> {gb(k.peak)} {mark} ({k.effect})", highlight=False)
    console.print(f"\n[dim]Assumed: prompts of {ctx.prompt_length} tokens (--prompt-length), every sequence as long as "
                  "the recipe allows. CPU figures are resident memory; CUDA figures are tensors "
                  "(torch.cuda.max_memory_allocated) plus the CUDA context and the caching allocator's headroom "
                  "(compare with torch.cuda.max_memory_reserved).[/dim]", highlight=False)
