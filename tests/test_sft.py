"""Step 1 on the real QLoRA path (bitsandbytes NF4 on the CPU): learning, frozen base, plain-PEFT reload."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import yaml
from helpers import DEMOS, Stop, base_weights, recipe_dict, write_jsonl
from safetensors.torch import load_file

from lora_rlhf.core.base import SharedBase
from lora_rlhf.recipe.config import recipe_from_dict
from lora_rlhf.stages.sft import train_sft


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    data = write_jsonl(tmp / "demos.jsonl", DEMOS)
    recipe = recipe_from_dict(recipe_dict(
        tiny_model_dir, tmp / "run", cpu=True, data={"sft": {"path": str(data)}},
        sft={"max_steps": 30, "learning_rate": 1e-2, "logging_steps": 5, "save_steps": 10}))
    # A separate load of the same folder: NF4 quantization is deterministic, so equal means untouched.
    base_before = base_weights(SharedBase.load(recipe.model, recipe.quantization).model)
    out, shared = train_sft(recipe)
    return recipe, out, shared, base_before


def test_output_folder_holds_adapter_tokenizer_recipe_metrics_and_log(sft_run):
    recipe, out, _, _ = sft_run
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml",
                 "metrics.json", "train.log", "lora_rlhf.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "lora_rlhf.json").read_text())
    assert meta["stage"] == "sft" and meta["quantization"] == "4bit"
    assert yaml.safe_load((out / "recipe.yaml").read_text())["sft"]["max_steps"] == 30
    assert '"loss"' in (out / "train.log").read_text()


def test_loss_falls_on_memorisable_data(sft_run):
    metrics = json.loads((sft_run[1] / "metrics.json").read_text())
    assert metrics["last_logged_loss"] < 0.5 * metrics["first_logged_loss"], metrics


def test_adapter_changed_and_4bit_base_is_bit_identical(sft_run):
    _, out, shared, base_before = sft_run
    weights = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means it trained
    after = base_weights(shared.model)
    assert after.keys() == base_before.keys()
    quantized = [n for n, p in shared.model.named_parameters() if type(p).__name__ == "Params4bit"]
    assert quantized, "the base was not loaded in 4-bit"
    for name, tensor in base_before.items():
        assert torch.equal(tensor, after[name]), name


def test_saved_adapter_reloads_with_plain_peft_and_gives_identical_logits(sft_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_rlhf.core.loading import disable_cpu_weight_repacking, quantization_config

    recipe, out, shared, _ = sft_run
    ids = shared.tokenizer(["Say the magic word."], return_tensors="pt")
    shared.model.eval()
    with torch.no_grad(), shared.use("default") as model:
        trained = model(**ids).logits
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quantization_config(recipe.quantization, torch.float32),
        dtype=torch.float32, device_map={"": "cpu"})
    disable_cpu_weight_repacking(base)  # same 4-bit kernel as training (see the function's docstring)
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        reloaded = plain(**ids).logits
    assert torch.allclose(trained, reloaded, atol=1e-5), (trained - reloaded).abs().max()
    with torch.no_grad(), plain.disable_adapter():
        bare = plain(**ids).logits
    assert not torch.allclose(reloaded, bare, atol=1e-3)  # the adapter is really applied


def test_resume_continues_from_the_last_checkpoint(sft_run, tmp_path):
    # A copy of the finished run and of its recipe: the module's other tests keep seeing the original.
    recipe, out, _, _ = sft_run
    assert (out / "checkpoints" / "checkpoint-30").is_dir()
    recipe = copy.deepcopy(recipe)
    recipe.output_dir = str(tmp_path / "run")
    shutil.copytree(out, recipe.stage_dir("sft"))
    recipe.trainer_args["sft"]["max_steps"] = 35
    out2, _ = train_sft(recipe, resume=True)
    metrics = json.loads((out2 / "metrics.json").read_text())
    # Only the 5 new steps ran: the trainer restored step 30 from the checkpoint.
    log = [json.loads(line.split(" INFO ", 1)[1]) for line in (out2 / "train.log").read_text().splitlines()
           if " INFO {" in line]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps[-1] == 35 and 35 - 5 in steps
    assert metrics["epoch"] > 0


def test_final_eval_reuses_an_eval_logged_at_the_last_step():
    """Evaluating the final weights twice (epoch-end eval, then again after train) doubled the held-out pass."""
    import logging
    from types import SimpleNamespace

    from lora_rlhf.core.logs import LogCallback

    calls = []
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=8),
                              evaluate=lambda: calls.append(1) or {"eval_loss": 9.0})
    callback = LogCallback(logging.getLogger("test-final-eval"))
    state = SimpleNamespace(global_step=4)
    callback.on_log(None, state, None, logs={"eval_loss": 2.0, "eval_accuracy": 0.5})
    assert callback.final_eval(trainer) == {"eval_loss": 9.0} and calls == [1]  # logged eval is stale: evaluate
    state.global_step = 8
    callback.on_log(None, state, None, logs={"loss": 1.0})
    callback.on_log(None, state, None, logs={"eval_loss": 1.5, "eval_accuracy": 0.75, "epoch": 2.0})
    assert callback.final_eval(trainer) == {"eval_loss": 1.5, "eval_accuracy": 0.75} and calls == [1]
    trainer.args = SimpleNamespace(load_best_model_at_end=True)  # the final model is another checkpoint: evaluate
    assert callback.final_eval(trainer) == {"eval_loss": 9.0} and calls == [1, 1]


def test_a_new_run_that_fails_leaves_the_finished_run_intact(sft_run, tmp_path, monkeypatch):
    """A value TRL rejects only when the trainer is built (here: any error there) must not cost the finished run."""
    import trl

    recipe, out, _, _ = sft_run
    recipe = copy.deepcopy(recipe)
    recipe.output_dir = str(tmp_path / "run")
    shutil.copytree(out, recipe.stage_dir("sft"))
    before = {p.name: p.read_bytes() for p in recipe.stage_dir("sft").iterdir() if p.is_file()}

    def refuse(*args, **kwargs):
        raise ValueError("per_device_train_batch_size must be positive")

    monkeypatch.setattr(trl, "SFTTrainer", refuse)
    with pytest.raises(ValueError):
        train_sft(recipe)
    after = {p.name: p.read_bytes() for p in recipe.stage_dir("sft").iterdir() if p.is_file()}
    assert after == before and (recipe.stage_dir("sft") / "checkpoints" / "checkpoint-30").is_dir()


def test_a_bad_trainer_value_is_refused_before_the_output_folder_is_touched(sft_run, tmp_path):
    from typer.testing import CliRunner

    from lora_rlhf_cli.main import app

    recipe, out, _, _ = sft_run
    run = tmp_path / "run"
    shutil.copytree(out, run / "sft")
    before = sorted(p.name for p in (run / "sft").iterdir())
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": recipe.model.name}, "data": {"sft": {"path": recipe.data.sft.path}}}))
    result = CliRunner().invoke(app, ["sft", str(path), "--set", f"output_dir={run}",
                                      "--set", "sft.per_device_train_batch_size=0"])
    assert result.exit_code == 2 and "per_device_train_batch_size must be > 0" in result.output
    assert sorted(p.name for p in (run / "sft").iterdir()) == before


def test_a_full_disk_is_one_error_exit_2_and_the_finished_run_is_back(sft_run, tmp_path, monkeypatch):
    import errno

    from typer.testing import CliRunner

    from lora_rlhf.core.adapters import is_finished
    from lora_rlhf_cli.main import app

    recipe, out, _, _ = sft_run
    run = tmp_path / "run"
    shutil.copytree(out, run / "sft")
    before = {p.name: p.read_bytes() for p in (run / "sft").iterdir() if p.is_file()}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(run), "model": {"name": recipe.model.name},
                                    "data": {"sft": {"path": recipe.data.sft.path}}, "sft": {"max_steps": 1}}))

    def disk_full(self, role, folder, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder) + "/adapter_model.safetensors")

    monkeypatch.setattr(SharedBase, "save_adapter", disk_full)
    result = CliRunner().invoke(app, ["sft", str(path)])
    assert result.exit_code == 2, result.output
    assert f"no space left on the device while writing {run / 'sft'}" in result.output
    assert "nothing was marked complete; the previous finished run is back in place" in result.output
    assert "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in (run / "sft").iterdir() if p.is_file()} == before
    shutil.rmtree(run)
    result = CliRunner().invoke(app, ["sft", str(path)])  # no earlier run: nothing is left marked complete
    assert result.exit_code == 2 and "nothing was marked complete" in result.output
    assert not is_finished(run / "sft") and not (run / "sft" / "lora_rlhf.json").exists()


def test_resume_with_another_save_steps_uses_it_and_says_so(sft_run, tmp_path, caplog):
    """On resume the Trainer keeps the checkpoint's save_steps (it only warns): a run resumed with a smaller one
    wrote no checkpoint, and a kill then lost every step since the resume."""
    import logging

    recipe, out, _, _ = sft_run
    recipe = copy.deepcopy(recipe)
    recipe.output_dir = str(tmp_path / "run")
    shutil.copytree(out, recipe.stage_dir("sft"))
    recipe.trainer_args["sft"].update(max_steps=31, save_steps=1)  # the checkpoint says save_steps 10
    with caplog.at_level(logging.WARNING, logger="lora_rlhf.stages.trainer_setup"):
        out2, _ = train_sft(recipe, resume=True)
    message = "save_steps is 10 in the checkpoint and 1 in the recipe: continuing with 1"
    assert message in caplog.text and message in (out2 / "train.log").read_text()
    assert (out2 / "checkpoints" / "checkpoint-31").is_dir()  # 31 is no multiple of 10: saved because of 1


def test_sft_trains_on_the_chat_context_that_generation_uses(tiny_model_dir, tmp_path, monkeypatch):
    """TRL alone joins a string prompt and completion as plain text ("Say the magic word.banana ..."), a context
    generation never shows. The stage gives them as chat turns: what TRL trains on starts with `prompt_ids` (the
    ids every generation conditions on), the loss starts right after them, and the answer ends at end-of-turn."""
    from trl import SFTTrainer

    from lora_rlhf.core.text import longest_sft_row, prompt_ids
    from lora_rlhf.stages import sft as sft_stage

    seen = {}

    def tokenize_and_stop(recipe, shared, train, held_out, out, checkpoint, log):
        trainer = SFTTrainer(model=shared.model, args=sft_stage.sft_training_args(recipe, out, False),
                             train_dataset=train, processing_class=shared.tokenizer)
        seen["rows"], seen["tokenizer"] = list(trainer.train_dataset), shared.tokenizer
        seen["longest"] = longest_sft_row(shared.tokenizer, train)
        raise Stop

    monkeypatch.setattr(sft_stage, "_train", tokenize_and_stop)
    recipe = recipe_from_dict(recipe_dict(tiny_model_dir, tmp_path / "run", "none", cpu=True, lora=None,
                                          sft={"max_steps": 1},
                                          data={"sft": {"path": str(write_jsonl(tmp_path / "d.jsonl", DEMOS)),
                                                        "eval_fraction": 0}}))
    with pytest.raises(Stop):
        train_sft(recipe)
    tok = seen["tokenizer"]
    prompts = {tuple(prompt_ids(tok, d["prompt"])) for d in DEMOS}
    assert len(seen["rows"]) == len(DEMOS)
    for row in seen["rows"]:
        ids = row["input_ids"]
        start = next(i for i, label in enumerate(row["labels"]) if label != -100)  # TRL masks the prompt with -100
        assert tuple(ids[:start]) in prompts
        answer = ids[start:]
        assert tok.decode(answer).startswith(DEMOS[0]["completion"]) and tok.eos_token_id in answer
    # what the memory preflight sizes the largest batch by: TRL's longest row, counted without TRL
    assert seen["longest"] == max(len(row["input_ids"]) for row in seen["rows"])


LONG_ROWS = DEMOS[:2] + [
    {"prompt": "Say the magic word.", "completion": "banana " * 60},  # a long answer: cut, or dropped
    {"prompt": "Tell me the word, " + "please " * 60, "completion": "banana"},  # the prompt alone is too long
]


def long_rows_recipe(tiny_model_dir, tmp_path, max_length: int, mode: str | None = None):
    sft = {"max_steps": 1, "max_length": max_length, **({"long_rows": mode} if mode else {})}
    return recipe_from_dict(recipe_dict(tiny_model_dir, tmp_path / "run", "none", cpu=True, lora=None, sft=sft,
                                        data={"sft": {"path": str(write_jsonl(tmp_path / "d.jsonl", LONG_ROWS))}}))


def row_lengths(tiny_model_dir) -> list[tuple[int, int]]:
    import datasets

    from lora_rlhf.core.loading import load_tokenizer
    from lora_rlhf.core.text import as_chat_turns, prompt_ids, sft_row_ids

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = as_chat_turns(datasets.Dataset.from_list(LONG_ROWS), tokenizer)
    return [(len(sft_row_ids(tokenizer, row)), len(prompt_ids(tokenizer, row["prompt"]))) for row in rows]


@pytest.mark.parametrize("mode, trained, truncated, dropped", [(None, 3, 1, 1), ("drop", 2, 0, 2)])
def test_rows_longer_than_max_length_are_cut_or_dropped_and_counted(tiny_model_dir, tmp_path, caplog, mode, trained,
                                                                     truncated, dropped):
    """TRL cut the long answer and silently dropped the row whose prompt fills max_length, while metrics.json
    still said train_rows 4. The default (truncate) trains the beginning of the long answer; drop trains whole
    rows only; both say how many rows were affected, and train_rows is what TRL trained on."""
    lengths = row_lengths(tiny_model_dir)
    max_length = max(total for total, _ in lengths[:2])
    assert lengths[2][0] > max_length > lengths[2][1] and lengths[3][1] > max_length  # the rows are as named
    out, _ = train_sft(long_rows_recipe(tiny_model_dir, tmp_path, max_length, mode))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["long_rows"] == (mode or "truncate")
    assert metrics["train_rows"] == trained
    assert (metrics["rows_longer_than_max_length"], metrics["rows_truncated"], metrics["rows_dropped_too_long"]) \
        == (2, truncated, dropped)
    message = f"2 SFT row(s) are longer than sft.max_length={max_length} tokens: {truncated} cut to it"
    assert message in caplog.text and message in (out / "train.log").read_text()


def test_when_every_row_is_too_long_one_data_error_comes_before_the_model_loads(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    from lora_rlhf.errors import DataError

    def no_load(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(SharedBase, "load", no_load)
    shortest = min(total for total, _ in row_lengths(tiny_model_dir))
    recipe = long_rows_recipe(tiny_model_dir, tmp_path, shortest - 1, "drop")
    with pytest.raises(DataError, match=f"all 4 SFT rows are longer than sft.max_length={shortest - 1} tokens"):
        train_sft(recipe)
    longest_prompt = max(prompt for _, prompt in row_lengths(tiny_model_dir))
    recipe = long_rows_recipe(tiny_model_dir, tmp_path, 3)  # truncate: every prompt fills 3 tokens
    assert longest_prompt > 3
    with pytest.raises(DataError, match="all 4 SFT rows have a prompt at least as long as sft.max_length=3"):
        train_sft(recipe)
    assert not recipe.stage_dir("sft").exists()
