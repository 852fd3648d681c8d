"""Text to token ids, one way for every stage: chat templates, prompts, prompt + response, padding.

    prompt_ids(tok, prompt)             the prompt up to where the assistant's answer begins: what generation
                                        (PPO rollouts, compare, eval, chat) conditions on
    encode(tok, prompt, response)       prompt + response as the reward model reads it (training and scoring)
    as_chat_turns(rows, tok)            SFT's prompt/completion rows as chat turns (TRL then templates them)
    longest_sft_row(tok, rows)          tokens in the longest SFT row, for the memory preflight
    sft_row_lengths(tok, row)           an SFT row's tokens and the prompt tokens TRL keeps out of the loss
    longest_prompt(tok, prompts)        tokens in the longest prompt, for the memory preflight
    fit_prompts(tok, prompts, n, mode)  prompts cut from the left (or dropped) to at most n tokens
    pad(sequences, pad_id, side)        token lists -> (ids [B, T], attention mask [B, T])

A model without a chat template gets the plain text with the tokenizer's special tokens (its BOS), the same
in every stage, so a KL or a log-prob is computed on the very ids that were sampled. Masks are built from
lengths, never from token identity (SmolLM2's pad-like end-of-turn token sits inside every chat prompt).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import pad as trl_pad

Prompt = str | list[dict[str, str]]


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A prompt as chat messages: strings become one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def plain_text(prompt: Prompt) -> str:
    """A prompt without a chat template: the messages' contents, one per line."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of `prompt`, ending where the assistant's answer begins."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(plain_text(prompt))["input_ids"])


def response_ids(tokenizer: Any, response: str) -> list[int]:
    """A response's own ids, as they follow `prompt_ids` (no special tokens added)."""
    return list(tokenizer(response, add_special_tokens=False)["input_ids"])


def encode(tokenizer: Any, prompt: Prompt, response: str) -> list[int]:
    """Token ids of prompt + response as the reward model reads them (training and scoring alike).

    The sequence ends at the assistant turn's end-of-turn token: that is where generation stops, so a rollout
    that ended (prompt ids + sampled ids up to the stop token) is this same sequence and its score is read
    at the same position. What the template appends after it (SmolLM2: a newline) is dropped.
    """
    if has_chat_template(tokenizer):
        conversation = as_messages(prompt) + [{"role": "assistant", "content": response}]
        ids = list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
        eos = tokenizer.eos_token_id
        if eos in ids:
            end = len(ids) - ids[::-1].index(eos)
            # Only a whitespace tail is cut: an eos inside the prompt (a template whose turns end otherwise)
            # must not cut the response away.
            if tokenizer.decode(ids[end:]).strip() == "":
                ids = ids[:end]
        return ids
    # No chat template (a base model): the prompt's ids (BOS included) + the response, closed by EOS so the last
    # token marks the end.
    return prompt_ids(tokenizer, prompt) + response_ids(tokenizer, response + (tokenizer.eos_token or ""))


def as_chat_turns(rows: Any, tokenizer: Any) -> Any:
    """SFT rows (a `datasets.Dataset`) with string prompt/completion turned into chat turns, when the tokenizer
    has a chat template.

    TRL's SFTTrainer joins a string prompt and completion as plain text, while every other stage prompts through
    the chat template (`prompt_ids`): SFT would learn answers to a context generation never shows. As turns,
    TRL renders the prompt as `prompt_ids` does (add_generation_prompt) and the answer up to its end-of-turn
    token, where generation stops. Rows already in messages form, and plain `text` rows, are unchanged.
    """
    if not has_chat_template(tokenizer) or "completion" not in rows.column_names:
        return rows

    def turns(row: dict[str, Any]) -> dict[str, Any]:
        completion = row["completion"]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return {"prompt": as_messages(row["prompt"]), "completion": completion}

    return rows.map(turns, desc="SFT rows as chat turns")


def sft_row_ids(tokenizer: Any, row: dict[str, Any]) -> list[int]:
    """One SFT row's token ids as TRL's SFTTrainer renders it (after `as_chat_turns`): chat turns and messages
    through the template; plain prompt + completion or text as one string, closed by EOS."""
    if "messages" in row:
        turns = row["messages"]
    elif "prompt" in row and not isinstance(row["prompt"], str):
        turns = list(row["prompt"]) + list(row["completion"])
    else:
        text = row["prompt"] + row["completion"] if "prompt" in row else row["text"]
        return list(tokenizer(text)["input_ids"]) + [tokenizer.eos_token_id]
    return list(tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"])


def sft_row_lengths(tokenizer: Any, row: dict[str, Any]) -> tuple[int, int]:
    """(tokens, prompt tokens) of one SFT row as TRL renders it (`sft_row_ids`). The prompt tokens are those TRL
    keeps out of the loss by default: a prompt/completion row's prompt (`prompt_ids`, as the row starts); 0 for
    messages and text rows, which are trained whole."""
    prompt = len(prompt_ids(tokenizer, row["prompt"])) if "prompt" in row else 0
    return len(sft_row_ids(tokenizer, row)), prompt


def longest_sft_row(tokenizer: Any, rows: Any, candidates: int = 64) -> int:
    """Tokens in the longest SFT row (what sizes the largest batch)."""
    def chars(row: dict[str, Any]) -> int:
        return sum(len(v) if isinstance(v, str) else sum(len(m["content"]) for m in v) for v in row.values())

    return _most_tokens(rows, chars, lambda row: sft_row_ids(tokenizer, row), candidates)


def longest_prompt(tokenizer: Any, prompts: Sequence[Prompt], candidates: int = 64) -> int:
    """Tokens in the longest prompt as generation sees it (`prompt_ids`)."""
    return _most_tokens(prompts, lambda p: len(plain_text(p)), lambda p: prompt_ids(tokenizer, p), candidates)


def cut_prompt_left(tokenizer: Any, prompt: Prompt, max_tokens: int) -> Prompt | None:
    """`prompt` with its text cut from the left until `prompt_ids` has at most `max_tokens` tokens: the start of
    the first message goes first, then whole earlier messages; the template stays whole and the end, where the
    question usually is, is kept. None when even the last character does not fit (the template alone is longer).

    The cut is in characters, found by bisection (token counts fall as characters go), so the result is a prompt
    like any other: the reward model and a reward function see exactly the text the policy answered.
    """
    messages = as_messages(prompt)
    total = sum(len(m["content"]) for m in messages)

    def cut(k: int) -> Prompt:  # drop the first k characters of the conversation's text
        kept, skip = [], k
        for m in messages:
            if skip >= len(m["content"]):
                skip -= len(m["content"])
                continue
            kept.append({**m, "content": m["content"][skip:]})
            skip = 0
        return kept[0]["content"] if isinstance(prompt, str) else kept

    def fits(k: int) -> bool:
        return len(prompt_ids(tokenizer, cut(k))) <= max_tokens

    if fits(0):
        return prompt
    if total == 0 or not fits(total - 1):
        return None
    low, high = 0, total - 1  # fits(high) holds, fits(low) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return cut(high)


@dataclass
class FittedPrompts:
    """What `fit_prompts` did: counts, and the longest prompt left in tokens (what generation is sized by)."""

    max_tokens: int | None
    mode: str
    longer: int = 0
    truncated: int = 0
    dropped: int = 0
    longest: int = 0

    def describe(self) -> str:
        return (f"{self.longer} prompt(s) are longer than {self.max_tokens} tokens: {self.truncated} cut from the "
                f"left, {self.dropped} dropped")


def fit_prompts(tokenizer: Any, prompts: Sequence[Prompt], max_tokens: int | None,
                mode: str = "truncate") -> tuple[list[Prompt], FittedPrompts]:
    """Prompts of at most `max_tokens` tokens (`prompt_ids`): longer ones cut from the left (`truncate`, see
    `cut_prompt_left`; one that cannot fit is dropped) or dropped (`drop`). Every prompt is tokenised once, so
    the longest is exact; `max_tokens` None keeps all and searches the longest as `longest_prompt` does."""
    if max_tokens is None:
        return list(prompts), FittedPrompts(None, mode, longest=longest_prompt(tokenizer, prompts))
    kept, stats = [], FittedPrompts(max_tokens, mode)
    for prompt in prompts:
        n = len(prompt_ids(tokenizer, prompt))
        if n > max_tokens:
            stats.longer += 1
            prompt = cut_prompt_left(tokenizer, prompt, max_tokens) if mode == "truncate" else None
            if prompt is None:
                stats.dropped += 1
                continue
            stats.truncated += 1
            n = len(prompt_ids(tokenizer, prompt))
        kept.append(prompt)
        stats.longest = max(stats.longest, n)
    return kept, stats


def _most_tokens(items: Iterable[Any], chars: Callable[[Any], int], ids: Callable[[Any], list[int]],
                 candidates: int) -> int:
    """The most tokens of any item, searched among the `candidates` items with the most characters: tokenising
    a few is enough where characters and tokens go together, and a preflight must not tokenise a whole dataset."""
    return max((len(ids(item)) for item in heapq.nlargest(candidates, items, key=chars)), default=0)


def pad(sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right",
        device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, T], attention mask [B, T]) padded on `side` to the longest."""
    ids = [torch.tensor(list(s), dtype=torch.long) for s in sequences]
    masks = [torch.ones(len(s), dtype=torch.long) for s in sequences]
    return (trl_pad(ids, padding_value=pad_id, padding_side=side).to(device),
            trl_pad(masks, padding_value=0, padding_side=side).to(device))


def batches(sequences: Sequence[list[int]], batch_size: int, pad_id: int,
            device: torch.device | str) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(row indices, input_ids [B, T], attention_mask [B, T]) right-padded, rows sorted by length so that a
    batch holds similar lengths (less padding)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = pad([sequences[i] for i in rows], pad_id, "right", device)
        yield rows, ids, mask
