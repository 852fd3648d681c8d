"""A base + one adapter for using it: `generate`, `chat` and `score` (and anything else outside a pipeline).

One rule for which base an adapter is used on: the base, revision and quantization the adapter records in its
lora_rlhf.json (so that its outputs match training), unless a recipe or an explicit `model` says otherwise;
`--set quantization.mode=...` still overrides the recorded quantization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_rlhf.core.adapters import read_adapter_meta
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.io import read_jsonl
from lora_rlhf.core.scoring import score_texts
from lora_rlhf.errors import DataError, ModelError
from lora_rlhf.hub.client import local_adapter
from lora_rlhf.recipe.config import Recipe, load_recipe, recipe_from_dict


def settings_for(meta: dict[str, Any], recipe: Path | None = None, model: str | None = None,
                 overrides: list[str] | None = None) -> Recipe:
    """The recipe to load the base with, for an adapter whose metadata is `meta` ({} for the bare base)."""
    overrides = overrides or []
    cfg = load_recipe(recipe, overrides) if recipe else recipe_from_dict({}, overrides)
    recorded = meta.get("base", {})
    if model:
        cfg.model.name = model
    elif recipe is None and recorded.get("name_or_path"):
        cfg.model.name = recorded["name_or_path"]
        cfg.model.revision = recorded.get("revision")
        if meta.get("quantization") and not any(o.startswith("quantization.mode=") for o in overrides):
            cfg.quantization.mode = meta["quantization"]
    return cfg


def open_adapter(adapter: str | None, role: str = "policy", recipe: Path | None = None, model: str | None = None,
                 overrides: list[str] | None = None) -> tuple[SharedBase, str | None]:
    """(shared base, role to run) with `adapter` (folder or Hub reference; None = the bare base) loaded as `role`."""
    folder = local_adapter(adapter) if adapter else None
    meta = read_adapter_meta(folder) if folder is not None else {}
    if role == "reward" and folder is not None and meta.get("head") is None:
        raise ModelError(f"'{adapter}' is not a reward adapter (its lora_rlhf.json records no scalar head)",
                         fix="point at the output folder of `lora-rlhf reward` (e.g. runs/x/reward)")
    cfg = settings_for(meta, recipe, model, overrides)
    shared = SharedBase.load(cfg.model, cfg.quantization, for_training=False)
    if folder is None:
        return shared, None
    shared.load_adapter(role, folder, trainable=False)
    return shared, role


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """JSONL lines with `prompt` and `response` (one text) or `responses` (several) -> rows, validated."""
    rows = []
    for n, row in read_jsonl(path, "pairs file"):
        row = row if isinstance(row, dict) else {}
        texts = [row.get("response")] if "response" in row else row.get("responses")
        if not isinstance(row.get("prompt"), (str, list)) or not isinstance(texts, list) or not texts \
                or not all(isinstance(t, str) for t in texts):
            raise DataError(f"'{path}' line {n} needs 'prompt' and 'response' (a string) or 'responses' "
                            "(a list of strings)", fix="e.g. {\"prompt\": \"Hi\", \"response\": \"Hello!\"}")
        rows.append(row)
    if not rows:
        raise DataError(f"'{path}' holds no lines to score", fix="add JSONL lines with prompt and response")
    return rows


def score_rows(shared_base: SharedBase, rows: list[dict[str, Any]], batch_size: int = 16) -> list[dict[str, Any]]:
    """Rows from `read_pairs` with `score` (or `scores`, one per response) added."""
    prompts, responses = [], []
    for row in rows:
        for text in [row["response"]] if "response" in row else row["responses"]:
            prompts.append(row["prompt"])
            responses.append(text)
    scores = score_texts(shared_base, prompts, responses, batch_size=batch_size).cpu().tolist()
    out, i = [], 0
    for row in rows:
        if "response" in row:
            out.append({**row, "score": scores[i]})
            i += 1
        else:
            n = len(row["responses"])
            out.append({**row, "scores": scores[i:i + n]})
            i += n
    return out
