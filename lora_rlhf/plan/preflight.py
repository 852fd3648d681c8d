"""The preflight a stage runs before loading anything, and the per-stage peak-memory helpers.

Wiring into a stage (three lines, before the model is loaded):

    from lora_rlhf.plan.preflight import peak_bytes, preflight, reset_peak

    device = resolve_device(recipe.model)      # lora_rlhf.core.loading
    predicted = preflight(recipe, "ppo", device)   # raises OutOfMemoryPlan when it cannot fit
    reset_peak(device)                          # the stage's own high-water mark starts here
    ...                                         # load, train
    log("memory/peak_gb", peak_bytes(device) / 2**30, "memory/predicted_gb", predicted / 2**30)

`LORA_RLHF_SKIP_PREFLIGHT=1` turns the check off (the prediction is still returned), for a user who knows better
or a machine whose free memory is misreported.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch

from lora_rlhf.errors import LoraRlhfError
from lora_rlhf.plan.advice import advise, format_advice
from lora_rlhf.plan.model_shape import load_shape
from lora_rlhf.plan.recipe_plan import DEFAULT_PROMPT_LENGTH, PlanContext, stage_estimate
from lora_rlhf.recipe.config import Recipe

SKIP_ENV = "LORA_RLHF_SKIP_PREFLIGHT"


class OutOfMemoryPlan(LoraRlhfError):
    """A stage's predicted peak exceeds the device's free memory: stopped before loading, with the knobs."""


def free_bytes(device: torch.device) -> int:
    """Memory the stage may still take: CUDA free memory (torch.cuda.mem_get_info), or the CPU's MemAvailable
    from /proc/meminfo (plus this process's own resident set, which the stage's peak already counts)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = _meminfo("MemAvailable")
    return available + _status("VmRSS") if available else 0


def total_bytes(device: torch.device) -> int:
    """The device's whole memory: a GPU's total, or the machine's MemTotal."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    return _meminfo("MemTotal")


def preflight(recipe: Recipe, stage: str, device: torch.device, prompt_length: int | None = None,
              sequence_length: int | None = None) -> int:
    """Predict `stage`'s peak for `recipe` on `device` (bytes) and stop when it exceeds the free memory.

    stage: sft | compare | reward | dpo | ppo | ppo-ptx | eval; prompt_length: the data's longest prompt in tokens,
    planned at no fewer than the planner's 128 (else 128 is assumed); sequence_length: the data's longest
    training row in tokens, where the stage knows it (sft, reward, dpo, ppo-ptx's ptx rows; else max_length is
    assumed). Returns the predicted peak in bytes. Raises OutOfMemoryPlan (a LoraRlhfError: the CLI prints it and
    exits 2) whose `fix` lists the ranked `--set` lines that would fit, unless the environment variable
    LORA_RLHF_SKIP_PREFLIGHT=1 is set. A model whose config cannot be read (no Hub access) is not a reason to
    stop: the stage's own load reports that.
    """
    try:
        shape = load_shape(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    except LoraRlhfError:
        return 0
    # Prompts longer than 128 tokens are planned at their length (the 128 assumption would under-predict them),
    # shorter ones at 128, a margin: before estimate.CPU_PPO_LONG_ROWS, the CPU formula under-predicted PPO at the
    # data's own short length by ~10 % (docs/planner.md, "Predicted vs measured"); with it, -2 to -12 % in four
    # probes.
    ctx = PlanContext(device="cuda" if device.type == "cuda" else "cpu",
                      prompt_length=max(DEFAULT_PROMPT_LENGTH, prompt_length or 0), sequence_length=sequence_length)
    estimate = stage_estimate(recipe, stage, shape, ctx)
    free = free_bytes(device)
    if os.environ.get(SKIP_ENV) == "1" or not free or estimate.peak <= free:
        return estimate.peak
    knobs = advise(recipe, stage, shape, ctx, free)
    raise OutOfMemoryPlan(
        f"the {stage} stage is predicted to need {estimate.peak / 2**30:.1f} GB at its peak "
        f"({estimate.peak_phase.name}), but {device.type} has {free / 2**30:.1f} GB free: it would run out of memory",
        fix=format_advice(knobs, stage) + f"\n  or set {SKIP_ENV}=1 to start anyway (`lora-rlhf plan RECIPE` shows "
                                          "the breakdown)")


def reset_peak(device: torch.device) -> None:
    """Start a new high-water mark: CUDA's peak-allocation counter, or the process's VmHWM on Linux
    (writing 5 to /proc/self/clear_refs). Call it when a stage starts so its peak is its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: peak_bytes then reports the whole process's maximum
        pass


def peak_bytes(device: torch.device) -> int:
    """The high-water mark since the last reset_peak: torch.cuda.max_memory_allocated on CUDA (tensors only,
    without the CUDA context), else the resident set's peak (VmHWM; ru_maxrss where /proc is missing)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_reserved_bytes(device: torch.device) -> int | None:
    """On CUDA, the caching allocator's high-water mark since the last reset_peak (torch.cuda.max_memory_reserved):
    the allocated peak plus what fragmentation held, which is what meets the free memory. None on the CPU."""
    return int(torch.cuda.max_memory_reserved(device)) if device.type == "cuda" else None


def _status(key: str) -> int:
    return _kb_field(Path("/proc/self/status"), key)


def _meminfo(key: str) -> int:
    return _kb_field(Path("/proc/meminfo"), key)


def _kb_field(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
