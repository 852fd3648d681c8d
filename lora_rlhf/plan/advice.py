"""When a stage does not fit: the knobs that would make it fit, ranked, each with its predicted peak and the
exact `--set` lines (checked by the recipe loader, like any override).

Each knob is tried on the recipe through lora_rlhf.recipe.config.recipe_from_dict, so a suggested line is
always a valid override. Knobs that keep the run's results (gradient checkpointing, smaller micro-batches with
more accumulation, smaller forward batches, 8-bit optimizer states) rank before knobs that change what is
trained (shorter sequences, a lower LoRA rank, stronger quantization). When no single knob fits, the best
ones are combined greedily.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_rlhf.errors import RecipeError
from lora_rlhf.plan.estimate import PPO_CHECKPOINTS
from lora_rlhf.plan.model_shape import ModelShape
from lora_rlhf.plan.recipe_plan import PlanContext, stage_estimate, trainer_value
from lora_rlhf.recipe.config import Recipe, recipe_from_dict, recipe_to_dict


@dataclass(frozen=True)
class Knob:
    sets: tuple[str, ...]   # `--set` values, e.g. ("model.gradient_checkpointing=true",)
    peak: int               # predicted peak of the stage with them, bytes
    effect: str             # what it costs
    keeps_results: bool     # the same training, only slower (vs. a different run)

    @property
    def set_line(self) -> str:
        return " ".join(f"--set {s}" for s in self.sets)


def _candidates(recipe: Recipe, stage: str) -> list[tuple[tuple[str, ...], str, bool]]:
    """(overrides, effect, keeps results) worth trying for `stage`, from the recipe's current values."""
    out: list[tuple[tuple[str, ...], str, bool]] = []
    checkpointed = ("sft", "reward", "dpo", "ppo", "ppo-ptx") if PPO_CHECKPOINTS else ("sft", "reward", "dpo")
    if not recipe.model.gradient_checkpointing and stage in checkpointed:
        out.append((("model.gradient_checkpointing=true",), "~30 % slower steps, same results", True))
    if stage in ("sft", "reward", "dpo"):
        batch = trainer_value(recipe, stage, "per_device_train_batch_size")
        accum = trainer_value(recipe, stage, "gradient_accumulation_steps")
        length = trainer_value(recipe, stage, "max_length")
        if batch > 1:
            half = max(1, batch // 2)
            out.append(((f"{stage}.per_device_train_batch_size={half}",
                         f"{stage}.gradient_accumulation_steps={accum * batch // half}"),
                        "same effective batch, more, smaller steps", True))
        if "8bit" not in str(recipe.trainer_args[stage].get("optim", "")):
            out.append(((f"{stage}.optim=paged_adamw_8bit",), "8-bit AdamW states (small for LoRA)", True))
        if length > 64:
            out.append(((f"{stage}.max_length={length // 2}",),
                        "longer examples are cut (sft) or dropped (reward, dpo)", False))
    if stage in ("ppo", "ppo-ptx"):
        cfg = recipe.ppo
        mini = cfg.batch_size // cfg.num_mini_batches
        if mini // cfg.gradient_accumulation_steps > 1 and mini % (cfg.gradient_accumulation_steps * 2) == 0:
            out.append(((f"ppo.gradient_accumulation_steps={cfg.gradient_accumulation_steps * 2}",),
                        "half the optimisation micro-batch, same updates", True))
        forward = min(cfg.local_rollout_forward_batch_size, cfg.batch_size)
        if forward > 1:
            out.append(((f"ppo.local_rollout_forward_batch_size={forward // 2}",),
                        "half the rollout/scoring batch, same results", True))
        if stage == "ppo-ptx" and cfg.ptx_batch_size > 1:
            out.append(((f"ppo.ptx_batch_size={cfg.ptx_batch_size // 2}",), "fewer ptx rows per micro-batch", False))
        if cfg.response_length > 16:
            out.append(((f"ppo.response_length={cfg.response_length // 2}",), "shorter responses", False))
        if cfg.advantage_estimator == "gae" and cfg.batch_size % 2 == 0:
            out.append((("ppo.advantage_estimator=rloo", "ppo.num_generations=2"),
                        "no value adapter (RLOO baseline)", False))
    if stage == "compare" and recipe.compare.batch_size > 1:
        out.append(((f"compare.batch_size={recipe.compare.batch_size // 2}",), "slower sampling, same samples", True))
    if stage == "eval" and recipe.eval.batch_size > 1:
        out.append(((f"eval.batch_size={recipe.eval.batch_size // 2}",), "slower evaluation, same results", True))
    if recipe.lora.r > 4:
        out.append(((f"lora.r={recipe.lora.r // 2}", f"lora.alpha={max(1, recipe.lora.alpha // 2)}"),
                    "smaller adapters, less capacity", False))
    if recipe.quantization.mode != "4bit":
        out.append((("quantization.mode=4bit",), "NF4 base (QLoRA): ~4x smaller weights", False))
    elif not recipe.quantization.double_quant:
        out.append((("quantization.double_quant=true",), "~0.4 bit/param less", True))
    return out


def apply_sets(recipe: Recipe, sets: tuple[str, ...]) -> Recipe:
    """The recipe with `sets` applied, validated like `--set` (raises RecipeError when one does not apply)."""
    return recipe_from_dict(recipe_to_dict(recipe), list(sets), source="--set")


def _try(recipe: Recipe, stage: str, shape: ModelShape, ctx: PlanContext, sets: tuple[str, ...]) -> int | None:
    try:
        changed = apply_sets(recipe, sets)
    except RecipeError:  # a combination the recipe's own checks refuse (e.g. batch not divisible)
        return None
    return stage_estimate(changed, stage, shape, ctx).peak


def advise(recipe: Recipe, stage: str, shape: ModelShape, ctx: PlanContext, capacity: int,
           limit: int = 5) -> list[Knob]:
    """Knobs for `stage` ranked: those that fit `capacity` (bytes) first, result-keeping before result-changing,
    then the rest by predicted peak; when none fits alone, a greedy combination of up to four is added first."""
    knobs = []
    for sets, effect, keeps in _candidates(recipe, stage):
        peak = _try(recipe, stage, shape, ctx, sets)
        if peak is not None:
            knobs.append(Knob(sets, peak, effect, keeps))
    knobs.sort(key=lambda k: (k.peak > capacity, not k.keeps_results, k.peak))
    if knobs and all(k.peak > capacity for k in knobs):
        combined = _combine(recipe, stage, shape, ctx, capacity)
        if combined is not None:
            knobs.insert(0, combined)
    return knobs[:limit]


def _combine(recipe: Recipe, stage: str, shape: ModelShape, ctx: PlanContext, capacity: int) -> Knob | None:
    """Apply the single best knob, re-plan, repeat (at most four), until the stage fits."""
    sets: tuple[str, ...] = ()
    current, peak = recipe, stage_estimate(recipe, stage, shape, ctx).peak
    for _ in range(4):
        best = None
        for more, _, _ in _candidates(current, stage):
            p = _try(recipe, stage, shape, ctx, sets + more)
            if p is not None and p < peak and (best is None or p < best[1]):
                best = (more, p)
        if best is None:
            break
        sets, peak = sets + best[0], best[1]
        current = apply_sets(recipe, sets)
        if peak <= capacity:
            break
    if not sets:
        return None
    return Knob(_last_wins(sets), peak, "combined", False)


def _last_wins(sets: tuple[str, ...]) -> tuple[str, ...]:
    """Overrides of one key given twice (halved twice) keep the last value only."""
    keys: dict[str, str] = {}
    for s in sets:
        keys[s.split("=", 1)[0]] = s
    return tuple(keys.values())


def format_advice(knobs: list[Knob], stage: str) -> str:
    if not knobs:
        return f"no single setting makes {stage} fit: use a GPU with more memory or a smaller base model"
    lines = [f"to make {stage} fit, ranked (predicted peak with the change):"]
    lines += [f"    {k.set_line}    -> {k.peak / 2**30:.1f} GB ({k.effect})" for k in knobs]
    return "\n".join(lines)
