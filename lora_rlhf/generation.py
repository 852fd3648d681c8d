"""Text generation from the shared base with any role's adapter, through the model's chat template."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lora_rlhf.data import as_messages

Prompt = str | list[dict[str, str]]


def chat_text(tokenizer: Any, prompt: Prompt) -> str:
    """The prompt rendered with the chat template, ending where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


@torch.no_grad()
def generate_responses(
    shared_base: Any,
    prompts: Sequence[Prompt],
    role: str | None = "policy",
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """Sample `num_return_sequences` answers per prompt with adapter `role` (None = bare base).

    Returns one list of strings per prompt. Prompts are left-padded so that every row's answer starts at the
    same position; the KV cache makes each new token cost one forward over one position. `on_batch(n)` is
    called with the number of prompts finished (for progress bars).
    """
    tokenizer = shared_base.tokenizer
    out: list[list[str]] = []
    sampling = temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling, num_return_sequences=num_return_sequences,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with shared_base.use(role) as model:
            was_training = model.training
            model.eval()
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                enc = tokenizer([chat_text(tokenizer, p) for p in chunk], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(shared_base.device)
                ids = model.generate(**enc, **kwargs)
                texts = tokenizer.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
                for i in range(len(chunk)):
                    out.append([t.strip() for t in texts[i * num_return_sequences:(i + 1) * num_return_sequences]])
                if on_batch is not None:
                    on_batch(len(chunk))
            model.train(was_training)
    finally:
        tokenizer.padding_side = side
    return out
