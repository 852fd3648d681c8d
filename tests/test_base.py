"""The shared base: adapters by role, trainable sets across switches, base mismatch, embedded model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import randomize_adapter

from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.loading import load_tokenizer
from lora_rlhf.errors import ModelError
from lora_rlhf.recipe.config import recipe_from_dict


@pytest.fixture
def shared(tiny_model_dir):
    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir), "device": "cpu"}, "lora": {"r": 4}})
    base = SharedBase.load(recipe.model, recipe.quantization)
    base.add_adapter("reference", recipe.lora, trainable=False)
    base.add_adapter("reward", recipe.lora, trainable=False)
    base.add_head("reward")
    randomize_adapter(base, "reference", seed=1)  # non-zero: a copy that skipped tensors would differ
    randomize_adapter(base, "reward", seed=2)
    base.copy_adapter("reference", "policy", trainable=True)
    base.copy_adapter("reward", "value", trainable=True)
    return base


def snapshot(params):
    return [p.detach().clone() for p in params]


def test_switching_roles_keeps_both_trainable_adapters_learning_and_frozen_ones_untouched(shared):
    """PEFT's set_adapter makes only the active adapter trainable; SharedBase.use must undo that."""
    frozen = {r: snapshot(shared.trainable_parameters(r)) for r in ("reference", "reward")}
    trainable = {r: snapshot(shared.trainable_parameters(r)) for r in ("policy", "value")}
    params = shared.trainable_parameters("policy") + shared.trainable_parameters("value")
    opt = torch.optim.SGD(params, lr=0.5)
    ids = shared.tokenizer(["a b c d", "e f"], return_tensors="pt", padding=True)
    for _ in range(2):  # two steps: LoRA B starts at 0, so A only moves from the second step on
        with shared.use("policy") as model:
            policy_loss = model(**ids).logits.float().logsumexp(-1).mean()
        value_loss = shared.scalar("value", ids.input_ids, ids.attention_mask).pow(2).mean()
        (policy_loss + value_loss).backward()
        opt.step()
        opt.zero_grad()
    for role in ("policy", "value"):
        changed = [not torch.equal(a, b) for a, b in zip(trainable[role], shared.trainable_parameters(role), strict=True)]
        assert all(changed), f"{role}: {changed.count(False)} tensors did not move"
    for role in ("reference", "reward"):
        same = [torch.equal(a, b) for a, b in zip(frozen[role], shared.trainable_parameters(role), strict=True)]
        assert all(same), role
        assert not any(p.requires_grad for p in shared.trainable_parameters(role))


def test_copy_adapter_starts_identical(shared):
    ids = shared.tokenizer(["a b c"], return_tensors="pt")
    shared.train(False)  # LoRA dropout off: two passes differ by it otherwise
    with torch.no_grad():
        r = shared.scalar("reward", ids.input_ids, ids.attention_mask)
        v = shared.scalar("value", ids.input_ids, ids.attention_mask)
        with shared.use("reference") as m:
            ref = m(**ids).logits
        with shared.use("policy") as m:
            policy = m(**ids).logits
        with shared.use(None) as m:
            bare = m(**ids).logits
    assert torch.equal(r, v) and torch.equal(ref, policy)
    assert not torch.allclose(policy, bare, atol=1e-4)  # the copied adapter is not the zero update of a fresh one
    for role, copy in (("reference", "policy"), ("reward", "value")):
        for a, b in zip(shared.trainable_parameters(role) if role in shared.trainable else shared._params[role],
                        shared.trainable_parameters(copy), strict=False):
            assert torch.equal(a, b)


def test_copy_adapter_fails_rather_than_skip_a_tensor(shared, monkeypatch):
    from lora_rlhf.core import base as base_module

    monkeypatch.setattr(base_module, "_rename_adapter", lambda name, src, dst: name + ".nowhere")
    with pytest.raises(ModelError, match="cannot copy adapter 'reference' to 'spare'"):
        shared.copy_adapter("reference", "spare")


def test_reference_without_adapter_is_the_bare_base(tiny_model_dir):
    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)}, "lora": {"r": 4}})
    base = SharedBase.load(recipe.model, recipe.quantization)
    ids = base.tokenizer(["a b c"], return_tensors="pt")
    with torch.no_grad(), base.use("reference") as m:
        before = m(**ids).logits
    base.add_adapter("policy", recipe.lora)
    with torch.no_grad():
        for p in base.trainable_parameters("policy"):
            p.add_(0.1)
        with base.use("reference") as m:
            after = m(**ids).logits
        with base.use("policy") as m:
            policy = m(**ids).logits
    assert torch.equal(before, after)
    assert not torch.allclose(policy, after)


def test_adapter_for_another_base_is_refused(shared, tmp_path, other_tiny_model_dir):
    folder = tmp_path / "reward"
    shared.save_adapter("reward", folder, stage="reward")
    recipe = recipe_from_dict({"model": {"name": str(other_tiny_model_dir)}})
    other = SharedBase.load(recipe.model, recipe.quantization)
    with pytest.raises(ModelError, match=r"(?s)was trained on base .* but the loaded base is .*fix: set model.name"):
        other.load_adapter("reward", folder)


def test_saved_reward_adapter_round_trips_with_its_head(shared, tmp_path, tiny_model_dir):
    folder = tmp_path / "reward"
    shared.save_adapter("reward", folder, stage="reward")
    meta = json.loads((folder / "lora_rlhf.json").read_text())
    assert meta["head"]["file"] == "head.safetensors" and meta["role"] == "reward"
    recipe = recipe_from_dict({"model": {"name": str(tiny_model_dir)}})
    fresh = SharedBase.load(recipe.model, recipe.quantization)
    fresh.load_adapter("reward", folder)
    shared.train(False)  # dropout off in both (the adapter is non-zero, so dropout would change the output)
    fresh.train(False)
    ids = shared.tokenizer(["a b c"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(shared.scalar("reward", ids.input_ids, ids.attention_mask),
                              fresh.scalar("reward", ids.input_ids, ids.attention_mask), atol=1e-6)


def test_missing_adapter_folder_and_non_adapter_folder(shared, tmp_path):
    with pytest.raises(ModelError, match="adapter folder '.*nope' does not exist"):
        shared.load_adapter("x", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="holds no adapter_config.json"):
        shared.load_adapter("x", str(tmp_path / "empty"))


def test_embedded_model_is_a_plain_hf_folder_and_pads_with_a_distinct_token():
    from lora_rlhf.core.models import resolve_model

    folder = resolve_model("smollm2-135m-instruct")
    config = json.loads(folder and open(f"{folder}/config.json").read())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tok = load_tokenizer(folder)
    # <|im_end|> is SmolLM2's end of turn and sits inside every chat prompt: padding must be another token.
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0


def test_a_damaged_adapter_or_one_for_another_shape_is_one_clear_error(shared, tmp_path, tiny_model_dir,
                                                                       other_tiny_model_dir):
    import shutil

    from lora_rlhf.recipe.config import ModelConfig, QuantizationConfig

    shared.save_adapter("policy", tmp_path / "good", stage="sft")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "good", cut)
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy interrupted half-way
    fresh = SharedBase.load(ModelConfig(name=str(tiny_model_dir), device="cpu"), QuantizationConfig(mode="none"))
    with pytest.raises(ModelError, match="cannot be read .* damaged or was cut short"):
        fresh.load_adapter("policy", cut)
    anonymous = tmp_path / "no-meta"  # no lora_rlhf.json: no fingerprint to refuse it by
    shutil.copytree(tmp_path / "good", anonymous)
    (anonymous / "lora_rlhf.json").unlink()
    other = SharedBase.load(ModelConfig(name=str(other_tiny_model_dir), device="cpu"), QuantizationConfig(mode="none"))
    with pytest.raises(ModelError, match="does not fit the loaded base .* other shapes .*size mismatch"):
        other.load_adapter("policy", anonymous)
