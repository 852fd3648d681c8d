"""PPO checkpoints: everything `--resume` needs to continue exactly where a run stopped.

    OUT/ppo/checkpoint/
      policy/            the policy adapter (a plain PEFT folder; usable on its own)
      value/             the value adapter + head.safetensors
      optimizer.pt       optimizer, LR scheduler, fp16's loss scaler, each rank's RNG states (torch.load(weights_only=True))
      trainer_state.json step, episode, data positions, KL controller, reward normaliser, where roles came from

A checkpoint is written into `checkpoint.tmp/` and then swapped in by renames, so an interruption or a crash
at any moment leaves the previous checkpoint complete (`checkpoint.old/` is only there during the swap, and
is used if a crash hit between the two renames).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.heads import ScalarHead
from lora_rlhf.core.io import write_json_atomic, writing
from lora_rlhf.errors import ModelError

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAINABLE_ROLES = ("policy", "value")  # value only with GAE: `trained_roles` says which a run has


def trained_roles(sb: SharedBase) -> list[str]:
    return [role for role in TRAINABLE_ROLES if sb.has(role)]


def find_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint under `stage_dir`, or None."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        folder = stage_dir / name
        if (folder / STATE_FILE).is_file():
            return folder
    return None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(stage_dir: Path, sb: SharedBase, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], rng: list[dict[str, Any]] | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write a complete checkpoint atomically; return its folder. `rng`: every rank's RNG state, in rank order
    (default: this process's); `scaler`: fp16's loss scaler. Adapters, optimizer and scaler are the same on every
    rank, so rank 0's are saved."""
    final, tmp, old = stage_dir / CHECKPOINT, stage_dir / (CHECKPOINT + ".tmp"), stage_dir / (CHECKPOINT + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for role in trained_roles(sb):
        sb.save_adapter(role, tmp / role, stage="ppo")
    with writing(tmp / OPTIMIZER_FILE):  # torch.save's full-disk error has no errno
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng if rng is not None else [rng_state()],
                    "scaler": scaler.state_dict() if scaler is not None else {}},
                   tmp / OPTIMIZER_FILE)
    write_json_atomic(tmp / STATE_FILE, state)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def load_checkpoint(folder: Path, sb: SharedBase, optimizer: torch.optim.Optimizer,
                    scheduler: Any, rank: int = 0, scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """Restore adapters, head, optimizer, scheduler, `rank`'s RNG and the loss scaler from `folder`; return the
    trainer state."""
    from peft import set_peft_model_state_dict

    for role in trained_roles(sb):
        weights = load_file(str(folder / role / "adapter_model.safetensors"), device=str(sb.device))
        result = set_peft_model_state_dict(sb.model, weights, adapter_name=role)
        missing = [k for k in getattr(result, "missing_keys", []) if f".{role}." in k]
        if missing:
            raise ModelError(f"checkpoint '{folder}' does not fit the {role} adapter (missing {missing[0]} ...)",
                             fix="resume with the recipe the run was started with (same lora and model settings)")
        if role in sb.heads:
            saved = ScalarHead.load(folder / role, sb.device)
            with torch.no_grad():
                for p, q in zip(sb.heads[role].parameters(), saved.parameters(), strict=True):
                    p.copy_(q)
    extra = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and scaler.is_enabled() and extra.get("scaler"):  # {} from a run without fp16
        scaler.load_state_dict(extra["scaler"])
    rng = extra["rng"]
    set_rng_state(rng[rank] if isinstance(rng, list) else rng)  # a dict: written before data parallelism
    return json.loads((folder / STATE_FILE).read_text())
