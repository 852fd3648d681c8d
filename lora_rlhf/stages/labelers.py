"""Labelers for `lora-rlhf compare`: what ranks the K sampled responses of a prompt.

In the paper, people rank the responses. Here a labeler is either
  - a Python function named `module:function` or `file.py:function` (a programmatic stand-in for people):
    `fn(prompt, responses) -> list[float]` scores (higher is better), or a dict holding exactly one of
    `{"scores": [...]}`, `{"ranks": [...]}` (1 = best, ties equal) or `{"order": [best index, ...]}`; or
  - a reward adapter (folder or Hub id) whose scores rank the responses.

A labeler returns the judgement as a dict with `scores` or `ranks`, ready for a rankings line
(docs/FORMATS.md). A judgement that ties every response is returned as `{"skipped": True, ...}`: the prompt
gives no comparison rather than failing the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_rlhf.core.plugins import load_callable
from lora_rlhf.core.scoring import score_texts
from lora_rlhf.core.text import Prompt
from lora_rlhf.errors import ModelError, RecipeError
from lora_rlhf.hub.client import local_adapter
from lora_rlhf.stages.rankings import pairs_from_ranks, pairs_from_scores

Judge = Callable[[Prompt, list[str]], dict[str, Any]]


def is_function_spec(spec: str) -> bool:
    """`module:function` / `file.py:function` rather than an adapter folder or Hub id."""
    return ":" in spec and not Path(spec).expanduser().is_dir()


def normalize_judgement(result: Any, k: int, spec: str) -> dict[str, Any]:
    """A labeler's return value -> {"scores": [...]} or {"ranks": [...]} (+ "skipped" when all tied)."""
    if isinstance(result, dict):
        keys = [key for key in ("scores", "ranks", "order") if key in result]
        if len(keys) != 1:
            raise RecipeError([f"labeler '{spec}' returned a dict with keys {sorted(result)}; it needs exactly one "
                               "of 'scores', 'ranks' or 'order'"])
        key, values = keys[0], result[keys[0]]
    else:
        key, values = "scores", result
    if hasattr(values, "tolist"):  # numpy arrays and tensors
        values = values.tolist()
    if key == "order":
        if not isinstance(values, (list, tuple)) or sorted(values) != list(range(k)):
            raise RecipeError([f"labeler '{spec}' returned order {values!r}; it must list each of the {k} "
                               "response indices once, best first"])
        ranks = [0] * k
        for place, index in enumerate(values):
            ranks[index] = place + 1
        key, values = "ranks", ranks
    if (not isinstance(values, (list, tuple)) or len(values) != k
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in values)):
        raise RecipeError([f"labeler '{spec}' returned {str(values)[:80]!r}; it must give {k} finite numbers "
                           f"({key}), one per response"])
    values = [float(v) if key == "scores" else v for v in values]
    judgement: dict[str, Any] = {key: values}
    if not (pairs_from_scores(values) if key == "scores" else pairs_from_ranks(values)):
        judgement["skipped"] = True  # all tied: nothing to learn from this prompt
    return judgement


def function_labeler(spec: str) -> Judge:
    fn = load_callable(spec, what="compare.labeler")

    def judge(prompt: Prompt, responses: list[str]) -> dict[str, Any]:
        return normalize_judgement(fn(prompt, list(responses)), len(responses), spec)

    return judge


def adapter_labeler(spec: str, shared_base: Any, batch_size: int = 16) -> Judge:
    """Load a reward adapter onto `shared_base` (role `reward`; refused if trained on another base)."""
    shared_base.load_adapter("reward", local_adapter(spec), trainable=False)
    if "reward" not in shared_base.heads:
        raise ModelError(f"compare.labeler '{spec}' has no scalar head (head.safetensors), so it cannot score",
                         fix="use the output folder of `lora-rlhf reward`, or a `module:function` labeler")

    def judge(prompt: Prompt, responses: list[str]) -> dict[str, Any]:
        scores = score_texts(shared_base, [prompt] * len(responses), responses, batch_size=batch_size)
        return normalize_judgement(scores.cpu().tolist(), len(responses), spec)

    return judge


def load_labeler(spec: str, shared_base: Any) -> Judge:
    """A function labeler or a reward-adapter labeler, validated (imported / loaded) before any sampling."""
    return function_labeler(spec) if is_function_spec(spec) else adapter_labeler(spec, shared_base)
