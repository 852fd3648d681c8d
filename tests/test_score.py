"""`lora-rlhf score`: the CLI scores pairs with the library's one scoring path (offset applied)."""

from __future__ import annotations

import json

import pytest
from helpers import make_reward_adapter, write_jsonl
from typer.testing import CliRunner

from lora_rlhf.core.scoring import score_texts
from lora_rlhf.stages.inference import open_adapter
from lora_rlhf_cli.main import app


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_reward_adapter(tiny_model_dir, tmp_path_factory.mktemp("rm") / "reward", offset=0.5)


def test_score_one_pair_and_a_file(adapter, tmp_path):
    shared, _ = open_adapter(adapter, "reward")
    raw = score_texts(shared, ["Hi", "Hi", "Hi"], ["Hello!", "Go away.", "Hey"], apply_offset=False).tolist()
    result = CliRunner().invoke(app, ["score", str(adapter), "--prompt", "Hi", "--response", "Hello!"])
    assert result.exit_code == 0, result.output
    assert float(result.stdout.strip()) == pytest.approx(raw[0] - 0.5, abs=1e-3)  # offset applied

    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "response": "Go away.", "id": 7},
                                          {"prompt": "Hi", "responses": ["Hello!", "Hey"]}])
    result = CliRunner().invoke(app, ["score", str(adapter), "--file", str(tmp_path / "pairs.jsonl"),
                                      "-o", str(tmp_path / "scored.jsonl")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert rows[0]["id"] == 7 and rows[0]["score"] == pytest.approx(raw[1] - 0.5, abs=1e-5)
    assert rows[1]["scores"] == pytest.approx([raw[0] - 0.5, raw[2] - 0.5], abs=1e-5)


def test_score_errors_exit_2(adapter, tmp_path, tiny_model_dir):
    runner = CliRunner()
    result = runner.invoke(app, ["score", str(adapter), "--prompt", "Hi"])
    assert result.exit_code == 2 and "nothing to score" in result.output
    (tmp_path / "bad.jsonl").write_text('{"prompt": "Hi"}\n')
    result = runner.invoke(app, ["score", str(adapter), "--file", str(tmp_path / "bad.jsonl")])
    assert result.exit_code == 2 and "line 1 needs 'prompt' and 'response'" in result.output
    result = runner.invoke(app, ["score", str(tmp_path / "missing"), "-p", "Hi", "--response", "x"])
    assert result.exit_code == 2 and "does not exist" in result.output
    # An adapter without a head (an SFT adapter) cannot score.
    sft = tmp_path / "sft"
    sft.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (sft / name).write_bytes((adapter / name).read_bytes())
    meta = json.loads((adapter / "lora_rlhf.json").read_text())
    (sft / "lora_rlhf.json").write_text(json.dumps({**meta, "stage": "sft", "role": "policy", "head": None}))
    result = runner.invoke(app, ["score", str(sft), "-p", "Hi", "--response", "x"])
    assert result.exit_code == 2 and "not a reward adapter" in result.output


def test_encode_is_the_sequence_a_finished_rollout_has(tiny_model_dir):
    # PPO scores a rollout on its own ids: chat prompt (with the generation prompt) + sampled tokens up to the
    # stop token. The RM is trained and scored on `encode`, so the two must be the same token sequence.
    from lora_rlhf.core.loading import load_tokenizer
    from lora_rlhf.core.text import encode, prompt_ids

    tok = load_tokenizer(str(tiny_model_dir))
    for prompt, response in [("Tell me about cats.", "Cats are small, furry animals."),
                             ([{"role": "user", "content": "Name a fruit."}], "banana")]:
        rollout = (prompt_ids(tok, prompt)
                   + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        assert encode(tok, prompt, response) == rollout
