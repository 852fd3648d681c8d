"""`lora-rlhf merge`: the merged model computes what base + adapter computed; refusals come before any write."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import randomize_adapter
from safetensors import safe_open
from typer.testing import CliRunner

from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.heads import gather_last
from lora_rlhf.errors import ModelError
from lora_rlhf.hub.merge import merge_adapter
from lora_rlhf.recipe.config import LoraSettings, ModelConfig, QuantizationConfig
from lora_rlhf_cli.main import app

runner = CliRunner()
IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 1000], [8, 9, 10, 11, 12, 13, 14]])
MASK = torch.ones_like(IDS)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Policy and reward adapters with non-zero LoRA B (a fresh LoRA is the identity: merging it proves nothing),
    saved like the stages save them, plus their fp32 outputs computed through PEFT."""
    root = tmp_path_factory.mktemp("merge")
    sb = SharedBase.load(ModelConfig(name=str(tiny_model_dir), device="cpu", dtype="fp32"),
                         QuantizationConfig(mode="none"), for_training=False)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    sb.add_adapter("policy", lora)
    sb.add_adapter("reward", lora)
    sb.add_head("reward")
    randomize_adapter(sb, "policy", std=0.5, seed=1)
    randomize_adapter(sb, "reward", std=0.5, seed=2, head_bias=0.3)
    sb.save_adapter("policy", root / "policy", "sft")
    sb.save_adapter("reward", root / "reward", "reward", reward_offset=0.1)
    with torch.no_grad(), sb.use("policy") as model:
        policy_logits = model(input_ids=IDS, attention_mask=MASK).logits
    with torch.no_grad(), sb.use(None) as model:
        base_logits = model(input_ids=IDS, attention_mask=MASK).logits
    with torch.no_grad():
        reward = gather_last(sb.scalar("reward", IDS, MASK), MASK) - 0.1
    return {"root": root, "policy_logits": policy_logits, "base_logits": base_logits, "reward": reward}


def test_merged_policy_logits_equal_base_plus_adapter(adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(adapters["root"] / "policy"), str(out), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()  # a plain model: no PEFT needed to load it
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = merged(input_ids=IDS, attention_mask=MASK).logits
    assert (adapters["policy_logits"] - adapters["base_logits"]).abs().max() > 1.0  # the adapter matters
    torch.testing.assert_close(logits, adapters["policy_logits"], atol=1e-4, rtol=1e-4)
    assert "library_name: transformers" in (out / "README.md").read_text()


def test_default_merge_is_bf16(adapters, tmp_path):
    out = tmp_path / "bf16"
    merge_adapter(adapters["root"] / "policy", out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_reward_adapter_exports_sequence_classifier_with_same_scores(adapters, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    result = merge_adapter(adapters["root"] / "reward", out, dtype="fp32")
    assert result.kind == "sequence-classification"
    assert (out / "head.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    assert model.config.lora_rlhf_score_shift == pytest.approx(0.3 - 0.1)
    with torch.no_grad():
        scores = model(input_ids=IDS, attention_mask=MASK).logits.squeeze(-1) + model.config.lora_rlhf_score_shift
    torch.testing.assert_close(scores, adapters["reward"], atol=1e-4, rtol=1e-4)


def test_merging_into_4bit_is_refused_with_the_reason(adapters, tmp_path):
    out = tmp_path / "q"
    result = runner.invoke(app, ["merge", str(adapters["root"] / "policy"), str(out), "--dtype", "4bit"])
    assert result.exit_code == 2
    assert "cannot merge into 4bit weights" in result.output and "--dtype bf16" in result.output
    assert not out.exists()


def test_quantized_base_checkpoint_is_refused(adapters, tiny_model_dir, tmp_path):
    quantized = tmp_path / "tiny-bnb-4bit"
    quantized.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4"}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"stored quantized \(bitsandbytes\).*\n.*unquantized base"):
        merge_adapter(adapters["root"] / "policy", tmp_path / "out", model=str(quantized))
    assert not (tmp_path / "out").exists()


def test_merge_onto_another_base_names_both(adapters, other_tiny_model_dir, tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match=f"trained on base '{tiny_model_dir}'.*loaded base is '{other_tiny_model_dir}'"):
        merge_adapter(adapters["root"] / "policy", tmp_path / "out", model=str(other_tiny_model_dir))
    assert not (tmp_path / "out").exists()


def test_existing_output_folder_is_not_overwritten(adapters, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="already exists and is not empty"):
        merge_adapter(adapters["root"] / "policy", tmp_path / "out", dtype="fp32")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_adapter_without_metadata_needs_model(adapters, tiny_model_dir, tmp_path):
    plain = tmp_path / "plain-peft"
    shutil.copytree(adapters["root"] / "policy", plain)
    (plain / "lora_rlhf.json").unlink()
    with pytest.raises(ModelError, match="no lora_rlhf.json naming its base.*\n.*--model"):
        merge_adapter(plain, tmp_path / "out")
    merge_adapter(plain, tmp_path / "out", dtype="fp32", model=str(tiny_model_dir))
    assert (tmp_path / "out" / "model.safetensors").is_file()
