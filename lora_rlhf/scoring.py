"""Score (prompt, response) pairs with a reward adapter on the shared base: the one scoring path everyone uses.

    score = head(hidden state at the last real token of chat_template(prompt + response)) - reward_offset

`encode` defines the text the reward model sees, both in training (lora_rlhf/reward.py tokenizes every
comparison with it) and here, so a PPO rollout is scored exactly as the comparisons were: the prompt as chat
messages (a string becomes one user turn), the response as one assistant turn, rendered with the tokenizer's
chat template. `reward_offset` (lora_rlhf.json) is the raw mean score of the SFT demonstrations, so that
they score 0 on average (the paper's bias).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lora_rlhf.data import as_messages
from lora_rlhf.errors import ModelError

Prompt = str | list[dict[str, str]]


def conversation(prompt: Prompt, response: str) -> list[dict[str, str]]:
    return as_messages(prompt) + [{"role": "assistant", "content": response}]


def encode(tokenizer: Any, prompt: Prompt, response: str) -> list[int]:
    """Token ids of prompt + response as the reward model reads them (training and scoring alike).

    The sequence ends at the assistant turn's end-of-turn token: that is where generation stops, so a rollout
    that ended (chat prompt ids + sampled ids up to the stop token) is this same sequence and its score is read
    at the same position. What the template appends after it (SmolLM2: a newline) is dropped.
    """
    if getattr(tokenizer, "chat_template", None):
        ids = list(tokenizer.apply_chat_template(conversation(prompt, response), tokenize=True,
                                                 return_dict=True)["input_ids"])
        eos = tokenizer.eos_token_id
        if eos in ids:
            end = len(ids) - ids[::-1].index(eos)
            # Only a whitespace tail is cut: an eos inside the prompt (a template whose turns end otherwise)
            # must not cut the response away.
            if tokenizer.decode(ids[end:]).strip() == "":
                ids = ids[:end]
        return ids
    # No chat template (a base model): plain concatenation, closed by EOS so the last token marks the end.
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return tokenizer(text + response + (tokenizer.eos_token or ""))["input_ids"]


def batches(sequences: Sequence[list[int]], batch_size: int, pad_id: int,
            device: torch.device | str) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(row indices, input_ids [B, T], attention_mask [B, T]) right-padded, rows sorted by length so that a
    batch holds similar lengths (less padding)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            seq = sequences[i]
            ids[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[r, :len(seq)] = 1
        yield rows, ids.to(device), mask.to(device)


def reward_offset(shared_base: Any, role: str = "reward") -> float:
    return float(shared_base.roles.get(role, {}).get("reward_offset") or 0.0)


@torch.no_grad()
def score_texts(shared_base: Any, prompts: Sequence[Prompt], responses: Sequence[str], role: str = "reward",
                batch_size: int = 16, apply_offset: bool = True) -> torch.Tensor:
    """Reward of each (prompt, response) pair -> float32 tensor [N] on the base's device.

    `role` must be loaded on `shared_base` with a scalar head (SharedBase.load_adapter('reward', folder)).
    The adapter's `reward_offset` is subtracted unless `apply_offset=False` (raw head output).
    """
    from lora_rlhf.heads import gather_last

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if role not in shared_base.heads:
        raise ModelError(f"role '{role}' has no scalar head, so it cannot score",
                         fix="load a reward adapter (the output folder of `lora-rlhf reward`) for this role")
    tokenizer = shared_base.tokenizer
    sequences = [encode(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    scores = torch.empty(len(sequences), dtype=torch.float32, device=shared_base.device)
    model = shared_base.model
    was_training = model.training
    model.eval()  # LoRA dropout off: a score must not depend on the call
    try:
        for rows, ids, mask in batches(sequences, batch_size, tokenizer.pad_token_id, shared_base.device):
            values = shared_base.scalar(role, ids, mask)
            scores[rows] = gather_last(values, mask).float()
    finally:
        model.train(was_training)
    if apply_offset:
        scores -= reward_offset(shared_base, role)
    return scores


def load_reward_base(adapter: str | Path, recipe: Path | None = None, model: str | None = None,
                     overrides: list[str] | None = None) -> Any:
    """A shared base with `adapter` loaded as the `reward` role, for scoring outside a pipeline.

    The base and its quantization default to the ones the adapter records (so scores match training);
    a recipe or `model` overrides them.
    """
    from lora_rlhf.base import SharedBase, read_adapter_meta, resolve_adapter
    from lora_rlhf.config import load_recipe, recipe_from_dict

    folder = resolve_adapter(adapter)
    meta = read_adapter_meta(folder)
    if meta.get("head") is None:
        raise ModelError(f"'{adapter}' is not a reward adapter (its lora_rlhf.json records no scalar head)",
                         fix="point at the output folder of `lora-rlhf reward` (e.g. runs/x/reward)")
    cfg = load_recipe(recipe, overrides) if recipe else recipe_from_dict({}, overrides)
    if model:
        cfg.model.name = model
    elif recipe is None:
        cfg.model.name = meta["base"]["name_or_path"]
        cfg.model.revision = meta["base"].get("revision")
        if not any(o.startswith("quantization.mode=") for o in overrides or []):
            cfg.quantization.mode = meta.get("quantization", cfg.quantization.mode)
    shared = SharedBase.load(cfg.model, cfg.quantization, for_training=False)
    shared.load_adapter("reward", folder, trainable=False)
    return shared


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """JSONL lines with `prompt` and `response` (one text) or `responses` (several) -> rows, validated."""
    import json

    from lora_rlhf.errors import DataError

    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"'{path}' line {n} is not valid JSON ({e.msg})", fix="one JSON object per line") from None
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


def score_rows(shared_base: Any, rows: list[dict[str, Any]], batch_size: int = 16) -> list[dict[str, Any]]:
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
