"""Text generation from the shared base with any role's adapter, through the model's chat template."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lora_rlhf.core.text import Prompt, pad, prompt_ids


@contextlib.contextmanager
def dequantized_for_decoding(model: nn.Module) -> Iterator[None]:
    """On the CPU, give every 4-bit linear layer a dequantized copy of its weight while the block runs.

    bitsandbytes' CPU path dequantizes a 4-bit weight on every call and then runs `F.linear` on the result.
    Decoding calls every layer once per new token, so a 48-token answer dequantized the whole base 48 times
    (a PPO rollout of the demo: 15.6 -> 12.8 s without it, bench/bench_ppo_step.py). Dequantizing once per
    `generate` gives the same
    `F.linear` on the same numbers (bit-identical, see tests/test_core.py) for the cost of a compute-dtype copy
    of the linear weights while it runs (4 bytes a weight in fp32: 0.43 GB for the 135M base). GPUs keep
    bitsandbytes' fused 4-bit kernels, so nothing changes there.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cpu"]
    try:
        for layer in layers:
            dtype = layer.compute_dtype or torch.float32
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
            layer.forward = functools.partial(_dense_forward, layer, weight)  # the instance attribute wins
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


@contextlib.contextmanager
def sampling_as_given(model: nn.Module) -> Iterator[None]:
    """Sample with exactly the settings a `generate` call passes, none of the model's own generation defaults.

    transformers fills every setting a call leaves unset from the model's `generation_config`: a Hub model that
    ships `repetition_penalty: 1.05` (some instruct models do), `min_p` or `suppress_tokens` would reshape PPO's
    sampling distribution while its log-probs describe the plain tempered softmax: off-policy samples, a biased
    KL. While the block runs the model's defaults are a blank config holding only its special token ids, so what
    transformers fills in is its own neutral default for each setting.
    """
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes its base's on
    saved = inner.generation_config
    ids = {k: getattr(saved, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                 "decoder_start_token_id")}
    inner.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    try:
        yield
    finally:
        inner.generation_config = saved


def _dense_forward(layer: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # The arithmetic of bitsandbytes' Linear4bit.forward on the CPU, minus the dequantization.
    dtype = x.dtype
    x = x.to(weight.dtype)
    bias = None if layer.bias is None else layer.bias.to(weight.dtype)
    return nn.functional.linear(x, weight, bias).to(dtype)


@torch.no_grad()
def generate_ids(shared_base: Any, prompts: Sequence[Prompt], role: str | None = "policy",
                 max_new_tokens: int = 128, temperature: float = 0.7, top_p: float = 1.0,
                 num_return_sequences: int = 1, batch_size: int = 8,
                 on_batch: Callable[[int], None] | None = None) -> list[list[tuple[list[int], list[int]]]]:
    """Sample `num_return_sequences` answers per prompt with adapter `role` (None = bare base).

    Returns, per prompt, (prompt ids, answer ids) for each sample: the exact ids the model conditioned on and
    produced (up to and including the end-of-turn token when it stopped; padding dropped), so that anything
    computed afterwards (log-probs, KL) sees the same ids. Prompts are left-padded so every row's answer
    starts at the same position; the KV cache makes each new token cost one forward over one position.
    `temperature` 0 decodes greedily. `on_batch(n)` is called with the number of prompts finished.
    """
    tokenizer = shared_base.tokenizer
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                  num_return_sequences=num_return_sequences, pad_token_id=pad_id, eos_token_id=eos)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    out: list[list[tuple[list[int], list[int]]]] = []
    with shared_base.use(role) as model, dequantized_for_decoding(model), sampling_as_given(model):
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = [prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
                ids, mask = pad(chunk, pad_id, "left", shared_base.device)
                generated = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:].tolist()
                for i, query in enumerate(chunk):
                    rows = generated[i * num_return_sequences:(i + 1) * num_return_sequences]
                    out.append([(query, _until_stop(row, eos)) for row in rows])
                if on_batch is not None:
                    on_batch(len(chunk))
        finally:
            model.train(was_training)
    return out


def _until_stop(ids: list[int], eos: int | None) -> list[int]:
    """Generated ids up to and including the first end-of-turn token (what follows it is padding)."""
    if eos is not None and eos in ids:
        return ids[:ids.index(eos) + 1]
    return ids


def answer_text(tokenizer: Any, answer: list[int]) -> str:
    """A generated answer's ids as the text shown and judged: special tokens dropped, whitespace stripped."""
    return tokenizer.decode(answer, skip_special_tokens=True).strip()


def generate_responses(shared_base: Any, prompts: Sequence[Prompt], role: str | None = "policy",
                       max_new_tokens: int = 128, temperature: float = 0.7, top_p: float = 1.0,
                       num_return_sequences: int = 1, batch_size: int = 8,
                       on_batch: Callable[[int], None] | None = None) -> list[list[str]]:
    """`generate_ids`, decoded: one list of answer strings per prompt (special tokens dropped, stripped)."""
    samples = generate_ids(shared_base, prompts, role, max_new_tokens, temperature, top_p, num_return_sequences,
                           batch_size, on_batch)
    return [[answer_text(shared_base.tokenizer, answer) for _, answer in per_prompt] for per_prompt in samples]
