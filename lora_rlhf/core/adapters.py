"""Adapters on disk: their metadata (`lora_rlhf.json`), the base they belong to, and which adapter a recipe means.

A finished adapter folder holds a PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`), its
scalar head for the reward and value roles (`head.safetensors`), and `lora_rlhf.json`, written last: its
presence marks the folder complete. Hub references never reach this module: `lora_rlhf.hub.client.local_adapter`
turns them into local folders first.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from lora_rlhf import __version__
from lora_rlhf.core.heads import HEAD_FILE, ScalarHead
from lora_rlhf.core.io import write_json_atomic
from lora_rlhf.errors import ModelError
from lora_rlhf.recipe.config import Recipe

META_FILE = "lora_rlhf.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ROLES = ("policy", "reference", "reward", "value")
# Config fields that decide whether an adapter's weight shapes fit a base.
_FINGERPRINT_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim")

AdapterKind = Literal["policy", "reward"]


def base_fingerprint(config: Any) -> str:
    """A short hash of the base config's shape fields: equal fingerprints mean adapters are interchangeable."""
    shape = {k: getattr(config, k, None) for k in _FINGERPRINT_FIELDS}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def read_adapter_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def is_finished(folder: str | Path, kind: AdapterKind = "policy") -> bool:
    """A complete adapter folder: PEFT config + weights + our metadata (written last), and a head for rewards."""
    folder = Path(folder)
    needed = [META_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS] + ([HEAD_FILE] if kind == "reward" else [])
    return all((folder / name).is_file() for name in needed)


def recipe_adapter(recipe: Recipe, stage: Literal["sft", "reward"], explicit: str | None = None) -> str | None:
    """Which SFT or reward adapter a recipe means: `explicit` (a folder or Hub reference) when set, else the
    recipe's own stage output (OUT/sft, OUT/reward) when it is finished, else None (no such adapter)."""
    if explicit:
        return explicit
    folder = recipe.stage_dir(stage)
    return str(folder) if is_finished(folder, "reward" if stage == "reward" else "policy") else None


def local_adapter_folder(source: str | Path) -> Path:
    """`source` as an existing local PEFT adapter folder, or a clear error."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelError(f"adapter folder '{source}' does not exist",
                         fix="check the path; run the stage that writes it first")
    if not (path / ADAPTER_CONFIG).is_file():
        inner = [path / role for role in ("policy", "value") if (path / role / ADAPTER_CONFIG).is_file()]
        if inner:  # a PPO run folder: its adapters are one level down
            raise ModelError(f"'{source}' is a PPO run folder, not an adapter",
                             fix=f"point at its adapter: {' or '.join(str(p) for p in inner)}")
        raise ModelError(f"'{source}' holds no {ADAPTER_CONFIG}, so it is not a PEFT adapter folder",
                         fix="point at the output folder of `lora-rlhf sft`/`reward`/`ppo` (e.g. runs/x/sft)")
    if not (path / ADAPTER_WEIGHTS).is_file():
        pickled = sorted(p.name for p in path.glob("adapter_model.*"))
        raise ModelError(f"'{source}' has no {ADAPTER_WEIGHTS}" + (f", only {', '.join(pickled)}" if pickled else "")
                         + ": only safetensors weights are loaded (a pickled .bin runs code when it is read)",
                         fix="re-save the adapter with safetensors (PEFT's save_pretrained does by default)")
    return path


def check_adapter_base(folder: str | Path, base_info: dict[str, Any]) -> dict[str, Any]:
    """Refuse an adapter recorded as trained on another base; return its metadata."""
    meta = read_adapter_meta(folder)
    recorded = meta.get("base", {})
    if recorded.get("fingerprint") and recorded["fingerprint"] != base_info["fingerprint"]:
        raise ModelError(
            f"adapter '{folder}' was trained on base '{recorded.get('name_or_path')}' "
            f"(fingerprint {recorded['fingerprint']}), but the loaded base is '{base_info['name_or_path']}' "
            f"(fingerprint {base_info['fingerprint']}): its weights do not fit",
            fix=f"set model.name to '{recorded.get('name_or_path')}', or use an adapter trained on this base",
        )
    return meta


def role_kind(role: str) -> str:
    return role if role in ROLES else "policy"


def write_adapter_meta(folder: str | Path, stage: str, role: str, base_info: dict[str, Any],
                       head: ScalarHead | None = None, **extra: Any) -> None:
    """Write lora_rlhf.json last and atomically: its presence marks the folder complete."""
    meta = {"format_version": 1, "stage": stage, "role": role,
            "base": {k: base_info[k] for k in ("name_or_path", "revision", "fingerprint")},
            "quantization": base_info["quantization"],
            "head": {"file": HEAD_FILE, "hidden_size": head.hidden_size} if head is not None else None,
            "lora_rlhf_version": __version__, **extra}
    write_json_atomic(Path(folder) / META_FILE, meta)
