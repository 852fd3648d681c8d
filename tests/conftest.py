"""Shared fixtures: a tiny Llama (2 layers, hidden 64) with the embedded model's tokenizer, built on the CPU.

The tiny model is random, so tests assert on mechanics (shapes, bit-identity, learning on memorisable data),
never on language quality.

LORA_RLHF_TEST_DEVICE=cuda (bench/gpu_check.sh sets it) runs the device-switched tests, those whose model comes
from `tiny_recipe` or `TEST_MODEL`, on the GPU: in fp32 there, so that the CPU's tolerances keep their meaning
(tests of the 16-bit paths set their dtype). Tests marked `cpu_only(reason)` are then skipped with that reason,
and tests marked `cuda_only(reason)` run only then.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

TEST_DEVICE = os.environ.get("LORA_RLHF_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"LORA_RLHF_TEST_DEVICE must be cpu or cuda, got {TEST_DEVICE!r}")
# The `model` section of a device-switched test's recipe (on the GPU in fp32: see the docstring).
TEST_MODEL = {"device": TEST_DEVICE, **({"dtype": "fp32"} if TEST_DEVICE == "cuda" else {})}
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            # Larger than the usual 0.02 so the tied embeddings are long enough for LoRA to sharpen
            # logits past the final RMSNorm: a 64-wide model can then memorise a few sentences.
            initializer_range=0.2)


def build_tiny_model(folder: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_rlhf.core.loading import load_tokenizer
    from lora_rlhf.core.models import prepare_embedded

    tokenizer = load_tokenizer(str(prepare_embedded("smollm2-135m-instruct")))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **{**TINY, **overrides})
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory) -> Path:
    """A base of another shape: adapters trained on `tiny_model_dir` must be refused on it."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-wide"), hidden_size=96, intermediate_size=192,
                            num_attention_heads=4, num_key_value_heads=2)


def randomize_adapter(sb, role: str, std: float = 0.05, seed: int = 0, head_bias: float | None = None) -> None:
    """Give `role` a non-zero LoRA update (PEFT starts B at zero, i.e. the bare base) and, when it has one, a random
    head: an adapter that really differs from the base and from every other adapter, so copies and reloads can
    be told apart from fresh ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sb.trainable_parameters(role) if role in sb.trainable else sb._params[role]:
            if p.ndim > 1:  # LoRA A and B (the head's weight is handled below)
                p.copy_(torch.randn(p.shape, generator=generator) * std)
        if role in sb.heads:
            sb.heads[role].linear.weight.copy_(torch.randn(sb.heads[role].linear.weight.shape, generator=generator))
            if head_bias is not None:
                sb.heads[role].linear.bias.fill_(head_bias)


class Stop(Exception):
    """Raised by a monkeypatched step: the stage ends where the test has seen what it checks."""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_recipe(tiny_model_dir, tmp_path):
    """A recipe dict on the tiny model; tests add data and stage sections."""

    def make(quantization: str = "4bit", **sections) -> dict:
        recipe = {
            "output_dir": str(tmp_path / "run"),
            "seed": 0,
            "model": {"name": str(tiny_model_dir), **TEST_MODEL},
            "quantization": {"mode": quantization},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        }
        recipe.update(sections)
        return recipe

    return make


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        for name, skipped in (("cpu_only", TEST_DEVICE != "cpu"), ("cuda_only", TEST_DEVICE != "cuda")):
            marker = item.get_closest_marker(name)
            if marker is not None and skipped:
                reason = marker.args[0] if marker.args else name
                item.add_marker(pytest.mark.skip(reason=f"{name} (LORA_RLHF_TEST_DEVICE={TEST_DEVICE}): {reason}"))
