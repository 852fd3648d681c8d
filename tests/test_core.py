"""Core rules that several stages share and must agree on: which adapter a recipe means, how text becomes ids,
and generation leaving shared state as it found it."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomize_adapter

from lora_rlhf.core.adapters import recipe_adapter
from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.generation import dequantized_for_decoding, generate_ids
from lora_rlhf.core.io import atomic_folder, read_jsonl, write_json_atomic
from lora_rlhf.core.loading import load_tokenizer
from lora_rlhf.core.text import encode, pad, prompt_ids
from lora_rlhf.errors import DataError, ModelError
from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig, recipe_from_dict
from lora_rlhf.stages.ppo.roles import resolve_sources

FINISHED_POLICY = ("adapter_config.json", "adapter_model.safetensors", "lora_rlhf.json")


def touch(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("{}")


def test_recipe_adapter_means_the_explicit_one_else_a_finished_stage(tmp_path):
    recipe = recipe_from_dict({"output_dir": str(tmp_path)})
    assert recipe_adapter(recipe, "sft") is None
    touch(tmp_path / "sft", ["lora_rlhf.json"])  # a marker without weights is not a finished adapter
    assert recipe_adapter(recipe, "sft") is None
    touch(tmp_path / "sft", FINISHED_POLICY)
    assert recipe_adapter(recipe, "sft") == str(tmp_path / "sft")
    assert recipe_adapter(recipe, "sft", "user/elsewhere") == "user/elsewhere"
    touch(tmp_path / "reward", FINISHED_POLICY)  # a reward adapter without its head is not finished
    assert recipe_adapter(recipe, "reward") is None
    touch(tmp_path / "reward", ["head.safetensors"])
    assert recipe_adapter(recipe, "reward") == str(tmp_path / "reward")


def test_ppo_and_eval_agree_on_a_reward_model_without_head(tmp_path):
    """Both ask recipe_adapter: a reward folder lacking head.safetensors is 'no reward model' for PPO and eval."""
    recipe = recipe_from_dict({"output_dir": str(tmp_path)})
    touch(tmp_path / "reward", FINISHED_POLICY)
    with pytest.raises(ModelError, match="PPO has no reward"):
        resolve_sources(recipe)


def no_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("templated", [True, False])
def test_one_encoding_for_generation_ppo_and_the_reward_model(tiny_model_dir, templated):
    """What generation conditions on (prompt_ids) is the start of what the RM reads (encode), BOS included or
    not in both, so PPO's log-probs, eval's KL and the RM's score see the same ids."""
    tok = load_tokenizer(str(tiny_model_dir))
    tok = tok if templated else no_template(tok)
    for prompt in ("Name a fruit.", [{"role": "user", "content": "Hi!"}]):
        query, full = prompt_ids(tok, prompt), encode(tok, prompt, "banana")
        assert full[:len(query)] == query and len(full) > len(query)
        if not templated:  # the tokenizer's own special tokens (a BOS where it adds one), in every stage
            text = prompt if isinstance(prompt, str) else prompt[0]["content"]
            assert query == tok(text)["input_ids"]


def test_pad_left_and_right_with_masks_from_lengths():
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad([[5, 0], [8]], pad_id=0, side="right")  # a real token equal to the pad id stays unmasked
    assert ids.tolist() == [[5, 0], [8, 0]] and mask.tolist() == [[1, 1], [1, 0]]


def test_shared_base_takes_the_tokenizer_a_stage_already_loaded(tiny_model_dir, monkeypatch):
    """A stage loads the tokenizer to size its preflight; the base then keeps that one instead of loading it
    again."""
    from lora_rlhf.core import loading

    cfg = ModelConfig(name=str(tiny_model_dir), device="cpu")
    tokenizer = loading.load_tokenizer(cfg)

    def not_again(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded a second time")

    monkeypatch.setattr(loading, "load_tokenizer", not_again)
    sb = SharedBase.load(cfg, QuantizationConfig(mode="none"), tokenizer=tokenizer)
    assert sb.tokenizer is tokenizer and sb.tokenizer.pad_token_id is not None


def test_generation_leaves_the_tokenizer_and_training_mode_as_it_found_them(tiny_model_dir, monkeypatch):
    sb = SharedBase.load(ModelConfig(name=str(tiny_model_dir), device="cpu"), QuantizationConfig(mode="none"))
    sb.train(True)
    torch.manual_seed(0)
    [[(query, answer)]] = generate_ids(sb, ["Say hi."], role=None, max_new_tokens=5)
    assert query == prompt_ids(sb.tokenizer, "Say hi.") and 1 <= len(answer) <= 5
    assert sb.tokenizer.padding_side == "right" and sb.model.training

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(sb.model, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        generate_ids(sb, ["Say hi."], role=None)
    assert sb.model.training  # restored on the error path too


@pytest.mark.parametrize("double_quant", [True, False])
def test_decoding_with_dequantized_weights_is_bit_identical_and_leaves_the_4bit_layers_as_they_were(
        tiny_model_dir, double_quant):
    """The CPU decoding shortcut computes exactly what bitsandbytes computes, in the same dtype, with and
    without double quantization, and afterwards the layers are plain 4-bit layers again (also after an error)."""
    import bitsandbytes as bnb

    sb = SharedBase.load(ModelConfig(name=str(tiny_model_dir), device="cpu"),
                         QuantizationConfig(mode="4bit", double_quant=double_quant), for_training=False)
    sb.add_adapter("policy", LoraSettings(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapter(sb, "policy")
    sb.train(False)
    layers = [m for m in sb.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    ids = torch.tensor([prompt_ids(sb.tokenizer, "Say hi.")])
    with torch.no_grad(), sb.use("policy") as model:
        expected = model(input_ids=ids).logits
        torch.manual_seed(0)
        sampled = model.generate(input_ids=ids, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0)
        with dequantized_for_decoding(model):
            assert all("forward" in m.__dict__ for m in layers)
            assert torch.equal(model(input_ids=ids).logits, expected)
            torch.manual_seed(0)
            assert torch.equal(model.generate(input_ids=ids, max_new_tokens=6, do_sample=True, top_k=0,
                                              pad_token_id=0), sampled)
        assert not any("forward" in m.__dict__ for m in layers)
        with pytest.raises(RuntimeError, match="boom"), dequantized_for_decoding(model):
            raise RuntimeError("boom")
        assert not any("forward" in m.__dict__ for m in layers)
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_io_atomic_writes_and_line_numbered_jsonl(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"a": float("nan"), "b": tmp_path})
    assert (tmp_path / "m.json").read_text().replace(" ", "").replace("\n", "") == f'{{"a":null,"b":"{tmp_path}"}}'
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(DataError, match="line 3: bad JSON"):
        read_jsonl(tmp_path / "x.jsonl")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "out") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_our_logs_are_read_past_a_last_line_that_a_kill_cut_short(tmp_path):
    """PPO appends metrics.jsonl line by line: a kill mid-line leaves a tail that the resumed run's truncation, the
    finished run's last metrics and eval's curves all read past (the truncation crashed on it)."""
    from lora_rlhf.stages.eval.report import read_metrics
    from lora_rlhf.stages.ppo.outputs import truncate_jsonl

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "kl": 0.5}\n{"step": 2, "kl": 0.7}\n{"step": 3, "k')
    with pytest.raises(DataError, match="line 3: bad JSON"):
        read_jsonl(log)  # a user's file: every line counts
    assert read_jsonl(log, cut_short_tail=True) == [(1, {"step": 1, "kl": 0.5}), (2, {"step": 2, "kl": 0.7})]
    assert [row["step"] for row in read_metrics(log)] == [1, 2]
    truncate_jsonl(log, last_step=1)
    assert log.read_text() == '{"step": 1, "kl": 0.5}\n'
    log.write_text('{"step": 1}\n{"step": \n{"step": 3}\n')  # a bad line with a newline is no cut-short tail
    with pytest.raises(DataError, match="line 2: bad JSON"):
        read_jsonl(log, cut_short_tail=True)


def test_the_bootstrap_resamples_whole_groups():
    from lora_rlhf.core.stats import bootstrap_interval

    # mean over groups: one item each, the same as counting each group once
    totals = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5])
    assert bootstrap_interval(totals) == bootstrap_interval(totals, torch.ones(5))
    assert bootstrap_interval(torch.full((4,), 0.25)) == pytest.approx((0.25, 0.25))
    # 2 groups: 10 of 10 items right and 0 of 10: every draw is 0, 1/2 or 1 (whole groups), never 9 of 20
    low, high = bootstrap_interval(torch.tensor([10.0, 0.0]), torch.tensor([10, 10]), seed=1)
    assert (low, high) == (0.0, 1.0)
    with pytest.raises(ValueError, match="at least one group"):
        bootstrap_interval(torch.zeros(0))


def test_an_adapter_is_used_on_the_base_and_quantization_it_records(tmp_path):
    """generate/chat and score share one rule: the recorded base AND quantization (generate used to load an
    adapter trained on an unquantized base in 4-bit); a recipe, --model or --set overrides it."""
    from lora_rlhf.stages.inference import settings_for

    meta = {"base": {"name_or_path": "some/base", "revision": "v1"}, "quantization": "none"}
    cfg = settings_for(meta)
    assert (cfg.model.name, cfg.model.revision, cfg.quantization.mode) == ("some/base", "v1", "none")
    assert settings_for(meta, overrides=["quantization.mode=4bit"]).quantization.mode == "4bit"
    assert settings_for(meta, model="other/base").model.name == "other/base"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: from/recipe}\nquantization: {mode: 8bit}\n")
    cfg = settings_for(meta, recipe=recipe)
    assert (cfg.model.name, cfg.quantization.mode) == ("from/recipe", "8bit")
    assert settings_for({}).model.name == "smollm2-135m-instruct"  # the bare base: the default model


def test_an_adapter_folder_with_only_pickled_weights_is_refused_before_loading(tmp_path):
    from lora_rlhf.core.adapters import local_adapter_folder

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickled")
    with pytest.raises(ModelError, match=r"has no adapter_model.safetensors, only adapter_model.bin: only "
                                         r"safetensors weights are loaded"):
        local_adapter_folder(tmp_path)


def test_a_ppo_run_folder_given_as_an_adapter_names_its_policy_adapter(tmp_path):
    from lora_rlhf.core.adapters import local_adapter_folder

    (tmp_path / "ppo" / "policy").mkdir(parents=True)
    (tmp_path / "ppo" / "policy" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="is a PPO run folder, not an adapter") as error:
        local_adapter_folder(tmp_path / "ppo")
    assert str(tmp_path / "ppo" / "policy") in error.value.fix
