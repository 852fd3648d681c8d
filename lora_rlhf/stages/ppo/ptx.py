"""PPO-ptx's data: a language-modelling loss on other text, against the "alignment tax" (the paper, eq. 2).

`data.ptx` holds `text` rows (every token is a target) or `prompt`/`completion` rows (only the completion's
tokens are targets; conversational rows go through the chat template). Rows are tokenised once, then served
in a fixed shuffled order per pass, so a resumed run continues at the same row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from lora_rlhf.core.data import check_text_or_messages, load_table, require_columns
from lora_rlhf.errors import DataError
from lora_rlhf.recipe.config import DatasetConfig

PTX_FORMATS = {"text": ("text",), "prompt_completion": ("prompt", "completion")}
IGNORE = -100


def load_ptx_rows(cfg: DatasetConfig, seed: int) -> list[dict[str, Any]]:
    """Read and validate data.ptx (before any model is loaded)."""
    ds = load_table(cfg, seed, what="ptx dataset")
    fmt = require_columns(ds, PTX_FORMATS, "ptx dataset", cfg.path)
    for column in PTX_FORMATS[fmt]:
        check_text_or_messages(ds, column, cfg.path, allow_messages=fmt != "text")
    return [{c: row[c] for c in PTX_FORMATS[fmt]} for row in ds]


def tokenize_row(tokenizer: Any, row: dict[str, Any], max_length: int) -> tuple[list[int], list[int]]:
    """One row -> (input_ids, labels) with IGNORE on tokens that are not targets (the prompt)."""
    if "text" in row:
        ids = tokenizer(row["text"])["input_ids"][:max_length]
        return ids, list(ids)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        completion_msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        prompt_text = tokenizer.apply_chat_template(prompt_msgs, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    labels = [IGNORE] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]
    return ids, labels


@dataclass
class PtxData:
    """Tokenised ptx rows served in batches; `position` counts rows served so far (saved in checkpoints)."""

    examples: list[tuple[list[int], list[int]]]
    seed: int
    position: int = 0

    @classmethod
    def build(cls, rows: list[dict[str, Any]], tokenizer: Any, max_length: int, seed: int) -> PtxData:
        examples = [tokenize_row(tokenizer, r, max_length) for r in rows]
        # A row whose completion was cut off entirely has no target: drop it rather than divide by zero later.
        examples = [e for e in examples if any(t != IGNORE for t in e[1][1:])]
        if not examples:
            raise DataError(f"no data.ptx row keeps a target token within ptx_max_length ({max_length})",
                            fix="raise ppo.ptx_max_length, or use shorter prompts in data.ptx")
        return cls(examples, seed)

    @property
    def longest(self) -> int:
        """Tokens in the longest row: no ptx batch is longer (the preflight sizes PPO-ptx by it)."""
        return max(len(ids) for ids, _ in self.examples)

    def next_batch(self, size: int, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The next `size` rows, right padded: input_ids, attention_mask, labels [size, T]."""
        rows = [self.examples[self._order_index(self.position + i)] for i in range(size)]
        self.position += size
        width = max(len(ids) for ids, _ in rows)
        out = {"input_ids": torch.full((size, width), pad_id), "attention_mask": torch.zeros((size, width)),
               "labels": torch.full((size, width), IGNORE)}
        for i, (ids, labels) in enumerate(rows):
            out["input_ids"][i, :len(ids)] = torch.tensor(ids)
            out["attention_mask"][i, :len(ids)] = 1
            out["labels"][i, :len(ids)] = torch.tensor(labels)
        return {k: v.long().to(device) for k, v in out.items()}

    def _order_index(self, k: int) -> int:
        return epoch_order(len(self.examples), self.seed, k)


def epoch_order(n: int, seed: int, k: int) -> int:
    """Row served k-th: each pass over n rows is a fresh permutation, a pure function of (seed, pass)."""
    epoch, offset = divmod(k, n)
    return _permutation(n, seed + epoch)[offset]


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def ptx_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy on the target tokens (the LM loss of PPO-ptx)."""
    return model(**batch, use_cache=False).loss


def rank_share(batch: dict[str, torch.Tensor], rank: int, world: int) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's rows of a ptx batch [N, T] and their share of its target tokens (0..1).

    Every rank draws the same global ptx batch; rank r takes rows [r N/W, (r+1) N/W). Weighting each rank's
    mean LM loss by its token share makes the sum over ranks the global batch's mean, as one process computes it.
    """
    if world == 1:
        return batch, 1.0
    size = batch["input_ids"].shape[0] // world
    part = {k: v[rank * size:(rank + 1) * size] for k, v in batch.items()}

    def targets(b: dict[str, torch.Tensor]) -> int:  # HF shifts labels: the first position predicts nothing
        return int((b["labels"][:, 1:] != IGNORE).sum())

    return part, targets(part) / max(targets(batch), 1)
