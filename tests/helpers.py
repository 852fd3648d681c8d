"""What the tests share besides fixtures (those are in conftest.py): the tiny model, the one recipe builder, hand-made
adapters standing in for finished stages, and the small datasets several test files train on. Tests import from
here, never from conftest.py or from one another.

The tiny model is a random Llama (2 layers, hidden 64) with the embedded model's tokenizer, built on the CPU: tests
assert on mechanics (shapes, bit-identity, learning on memorisable data), never on language quality.

LORA_RLHF_TEST_DEVICE=cuda (bench/gpu_check.sh sets it) runs the device-switched tests, those whose model comes
from `recipe_dict` (the `tiny_recipe` fixture) or `TEST_MODEL`, on the GPU: in fp32 there, so that the CPU's
tolerances keep their meaning (tests of the 16-bit paths set their dtype). Tests marked `cpu_only(reason)` are then
skipped with that reason, and tests marked `cuda_only(reason)` run only then.

The library is imported inside the functions: collecting a test file that uses none of it stays quick.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

TEST_DEVICE = os.environ.get("LORA_RLHF_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"LORA_RLHF_TEST_DEVICE must be cpu or cuda, got {TEST_DEVICE!r}")
# The `model` section of a device-switched test's recipe (on the GPU in fp32: see the docstring).
TEST_MODEL = {"device": TEST_DEVICE, **({"dtype": "fp32"} if TEST_DEVICE == "cuda" else {})}

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            # Larger than the usual 0.02 so the tied embeddings are long enough for LoRA to sharpen
            # logits past the final RMSNorm: a 64-wide model can then memorise a few sentences.
            initializer_range=0.2)
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}


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


# ---------------------------------------------------------------------------------------------- the recipe
def recipe_dict(model_dir: Path | str, output_dir: Path | str, quantization: str = "4bit", *, cpu: bool = False,
                lora: dict[str, Any] | None = LORA, **sections: Any) -> dict[str, Any]:
    """The tests' one recipe (a dict, for `recipe_from_dict` or a YAML file): seed 0, the model in `model_dir`,
    device-switched (see the module docstring) unless `cpu` pins it to the CPU, a small LoRA (`lora=None`: the
    recipe's default). Tests add data and stage sections, or replace any section."""
    recipe = {"output_dir": str(output_dir), "seed": 0,
              "model": {"name": str(model_dir), **({"device": "cpu"} if cpu else TEST_MODEL)},
              "quantization": {"mode": quantization}}
    if lora is not None:
        recipe["lora"] = dict(lora)
    recipe.update(sections)
    return recipe


class Stop(Exception):
    """Raised by a monkeypatched step: the stage ends where the test has seen what it checks."""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- adapters
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


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor (4-bit packed weights, norms, embeddings), cloned, by its name in the base."""
    return {n.removeprefix("base_model.model.").replace(".base_layer", ""): p.detach().clone()
            for n, p in model.named_parameters() if "lora_" not in n}


REWARD_OFFSET = 0.25


def make_adapters(model_dir: Path, out: Path) -> tuple[Path, Path]:
    """An SFT adapter and a reward adapter (+ head, offset REWARD_OFFSET) as steps 1 and 2 would leave them, in
    OUT/sft and OUT/reward (4-bit, device-switched)."""
    from lora_rlhf.core.base import SharedBase
    from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig

    sb = SharedBase.load(ModelConfig(name=str(model_dir), **TEST_MODEL), QuantizationConfig(mode="4bit"))
    lora = LoraSettings(**LORA)
    sb.add_adapter("policy", lora)
    sb.add_adapter("reward", lora)
    sb.add_head("reward")
    # non-zero B: the SFT policy differs from the base, the reward model from both
    randomize_adapter(sb, "policy", seed=1)
    randomize_adapter(sb, "reward", seed=2)
    sb.save_adapter("policy", out / "sft", stage="sft")
    sb.save_adapter("reward", out / "reward", stage="reward", reward_offset=REWARD_OFFSET)
    return out / "sft", out / "reward"


def make_reward_adapter(model_dir: Path, folder: Path, quantization: str = "none", offset: float = 0.0) -> Path:
    """A small reward adapter (random LoRA + head) saved the way `lora-rlhf reward` saves one (on the CPU)."""
    from lora_rlhf.core.base import SharedBase
    from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig

    shared = SharedBase.load(ModelConfig(name=str(model_dir), device="cpu"), QuantizationConfig(mode=quantization))
    shared.add_adapter("reward", LoraSettings(r=4, alpha=8, dropout=0.0))
    shared.add_head("reward")
    randomize_adapter(shared, "reward", std=0.5)
    shared.save_adapter("reward", folder, stage="reward", reward_offset=offset)
    return folder


def save_sft_adapter(recipe, folder: Path, seed: int = 0) -> None:
    """A trained-looking SFT adapter (non-zero LoRA B) on the recipe's base, saved as the SFT stage saves it."""
    from lora_rlhf.core.base import SharedBase
    from lora_rlhf.recipe.config import LoraSettings

    sb = SharedBase.load(recipe.model, recipe.quantization, for_training=False)
    sb.add_adapter("policy", LoraSettings(**LORA))
    randomize_adapter(sb, "policy", std=0.1, seed=seed)
    sb.save_adapter("policy", folder, stage="sft")


# ---------------------------------------------------------------------------------------------- data
# SFT demonstrations the tiny model memorises in a few dozen steps.
DEMOS = [{"prompt": p, "completion": "banana banana banana"}
         for p in ["Say the magic word.", "What is the magic word?", "Tell me the word.", "Magic word please."]]

# PPO on the tiny model: prompts (one in chat form) and settings small enough for seconds per step on two CPU cores.
PROMPTS = ["Say something.", "Tell me a story about a cat.", [{"role": "user", "content": "Hi!"}], "2+2?"]
FAST_PPO = {"total_episodes": 8, "batch_size": 4, "local_rollout_forward_batch_size": 4, "response_length": 6,
            "num_ppo_epochs": 1, "num_mini_batches": 2, "learning_rate": 1e-3, "temperature": 1.0,
            "save_steps": 1, "sample_every": 1}

# A reward function in a file, as a user would write it; env vars make it interrupt or fail on the N-th call.
REWARD_MODULE = '''
import os, signal
CALLS = 0

def count_e(prompts, responses):
    global CALLS
    CALLS += 1
    if os.environ.get("PPO_TEST_INTERRUPT_AT") == str(CALLS):
        os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during this step
    if os.environ.get("PPO_TEST_NAN_AT") == str(CALLS):
        return [float("nan")] * len(responses)
    return [float(r.count("e")) for r in responses]
'''

WORDS = "red blue green small large quick slow happy sad bright dark warm cold soft loud".split()


def answer(rng: random.Random, good: bool) -> str:
    words = rng.sample(WORDS, 3)
    if good:  # the preference to learn: answers that mention "banana" (never first: one token spelling) win
        words.insert(rng.randrange(1, 4), "banana")
    return " ".join(words)


def banana_rankings(n: int, seed: int = 0) -> list[dict]:
    """n prompts, each with 2 answers that mention "banana" ranked above 2 that do not (4 pairs per prompt)."""
    rng = random.Random(seed)
    return [{"id": f"p{i}", "prompt": f"Tell me about item {i}.",
             "responses": [answer(rng, True), answer(rng, False), answer(rng, True), answer(rng, False)],
             "scores": [1.0, 0.0, 1.0, 0.0]}  # ties within each class: 4 pairs per prompt
            for i in range(n)]


def demos(n: int = 8) -> list[dict]:
    """Demonstrations for the reward stage's offset: half of them with "banana"."""
    rng = random.Random(1)
    return [{"prompt": f"Say something {i}.", "completion": answer(rng, i % 2 == 0)} for i in range(n)]


def quick_overrides(out) -> list[str]:
    """--set values that shrink the demo recipe to seconds per stage (the demo end to end in test_pipeline.py; 2
    ranks in test_distributed.py)."""
    return [
        f"output_dir={out}", f"model.device={TEST_DEVICE}",
        f"data.sft.path={out}/data/sft.jsonl", f"data.prompts.path={out}/data/prompts_train.jsonl",
        f"data.ptx.path={out}/data/ptx.jsonl", f"data.eval.path={out}/data/prompts_eval.jsonl",
        f"eval.general_text={out}/data/general_eval.jsonl", "eval.general_max_texts=4", "eval.max_new_tokens=16",
        "pipeline.data_builder_args={n_demos: 4, n_train: 8, n_eval: 4, n_ptx: 8, n_general: 4, "
        "samples_per_prompt: 2, max_new_tokens: 16}",
        "sft.num_train_epochs=1", "compare.k=3", "compare.max_new_tokens=16",
        "reward.per_device_train_batch_size=6", "pipeline.reward_eval_fraction=0.25",
        "ppo.total_episodes=4", "ppo.batch_size=4", "ppo.local_rollout_forward_batch_size=4",
        "ppo.num_mini_batches=1", "ppo.num_ppo_epochs=1", "ppo.response_length=12", "ppo.save_steps=1",
        "ppo.ptx_batch_size=2",
    ]


def trainer_with_adapters(tiny_recipe, adapters: tuple[Path, Path], **ppo):
    """A PPO trainer on PROMPTS with FAST_PPO (+ `ppo`), its roles from `adapters` (the `stage_adapters` fixture)."""
    from lora_rlhf.recipe.config import recipe_from_dict
    from lora_rlhf.stages.ppo.roles import resolve_sources
    from lora_rlhf.stages.ppo.trainer import build_trainer

    sft, reward = adapters
    recipe = recipe_from_dict(tiny_recipe(ppo={**FAST_PPO, "sft_adapter": str(sft), "reward_adapter": str(reward),
                                               **ppo}))
    return build_trainer(recipe, resolve_sources(recipe), PROMPTS)
