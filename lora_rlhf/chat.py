"""Load a base + one adapter for generation (`generate`, `chat`)."""

from __future__ import annotations

from pathlib import Path

from lora_rlhf.base import SharedBase, read_adapter_meta, resolve_adapter
from lora_rlhf.config import Recipe, load_recipe, recipe_from_dict


def load_for_chat(adapter: str | None = None, recipe: Path | None = None, model: str | None = None,
                  overrides: list[str] | None = None) -> tuple[SharedBase, str | None]:
    """(shared base, role to generate with). The base defaults to the one the adapter records."""
    cfg: Recipe = load_recipe(recipe, overrides) if recipe else recipe_from_dict({}, overrides)
    folder = resolve_adapter(adapter) if adapter else None
    if model:
        cfg.model.name = model
    elif folder is not None and recipe is None:
        recorded = read_adapter_meta(folder).get("base", {})
        if recorded.get("name_or_path"):
            cfg.model.name = recorded["name_or_path"]
            cfg.model.revision = recorded.get("revision")
    shared = SharedBase.load(cfg.model, cfg.quantization, for_training=False)
    if folder is None:
        return shared, None
    shared.load_adapter("policy", folder, trainable=False)
    return shared, "policy"
