"""The CLI edge: help text, and bad input -> one clear message, exit 2, nothing written."""

from __future__ import annotations

import json

import yaml
from helpers import write_jsonl
from typer.testing import CliRunner

from lora_rlhf_cli.main import app

runner = CliRunner()


def test_help_lists_every_command_with_an_example():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    for command in ("sft", "generate", "chat"):
        assert command in result.output
    assert "e.g. lora-rlhf sft" in result.output


def _recipe(tmp_path, tiny_recipe, **sections):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(**sections)))
    return path


def test_unknown_key_exits_2_with_did_you_mean_and_writes_nothing(tmp_path, tiny_recipe):
    recipe = _recipe(tmp_path, tiny_recipe, sft={"learnin_rate": 1e-4})
    result = runner.invoke(app, ["sft", str(recipe)])
    assert result.exit_code == 2
    assert "unknown key 'sft.learnin_rate' (did you mean 'learning_rate'?)" in result.output
    assert not (tmp_path / "run").exists()


def test_wrong_type_exits_2(tmp_path, tiny_recipe):
    recipe = _recipe(tmp_path, tiny_recipe, lora={"r": "big"})
    result = runner.invoke(app, ["sft", str(recipe)])
    assert result.exit_code == 2
    assert "'lora.r' must be an integer, got 'big'" in result.output


def test_missing_data_file_exits_2_before_loading_the_model(tmp_path, tiny_recipe):
    recipe = _recipe(tmp_path, tiny_recipe, data={"sft": {"path": str(tmp_path / "missing.jsonl")}})
    result = runner.invoke(app, ["sft", str(recipe)])
    assert result.exit_code == 2
    assert "SFT dataset file" in result.output and "missing.jsonl' does not exist" in result.output
    assert not (tmp_path / "run").exists()


def test_a_jsonl_line_that_is_not_json_is_named_by_file_and_line(tmp_path, tiny_recipe):
    """datasets reported "An error occurred while generating the dataset" (and, in a library log, "row 2",
    counting from 0, for line 3)."""
    data = tmp_path / "demos.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n{"text": "d"}\n')
    result = runner.invoke(app, ["sft", str(_recipe(tmp_path, tiny_recipe, data={"sft": {"path": str(data)}}))])
    assert result.exit_code == 2, result.output
    assert f"SFT dataset file '{data}' line 3: bad JSON (Expecting value at column 10)" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_a_data_path_that_is_a_folder_and_an_output_dir_that_is_a_file_exit_2(tmp_path, tiny_recipe):
    (tmp_path / "demos.jsonl").mkdir()
    result = runner.invoke(app, ["sft", str(_recipe(tmp_path, tiny_recipe,
                                                    data={"sft": {"path": str(tmp_path / "demos.jsonl")}}))])
    assert result.exit_code == 2, result.output
    assert "demos.jsonl' is a folder, not a file" in result.output  # it said "does not exist"
    write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    (tmp_path / "afile").write_text("not a folder")
    for output_dir, message in ((tmp_path / "afile", "is a file, not a folder"),
                                (tmp_path / "afile" / "run", f"lies under '{tmp_path / 'afile'}', which is a file")):
        recipe = _recipe(tmp_path, tiny_recipe, data={"sft": {"path": str(tmp_path / "d.jsonl")}})
        result = runner.invoke(app, ["sft", str(recipe), "--set", f"output_dir={output_dir}"])
        assert result.exit_code == 2, result.output
        assert f"output_dir '{output_dir}' {message}" in result.output and "Traceback" not in result.output


def test_bad_column_and_empty_and_bad_rows(tmp_path, tiny_recipe):
    bad_col = write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "answer": "a"}])
    result = runner.invoke(app, ["sft", str(_recipe(tmp_path, tiny_recipe, data={"sft": {"path": str(bad_col)}}))])
    assert result.exit_code == 2
    assert "has columns ['question', 'answer'] but needs (messages) or (prompt, completion) or (text)" in result.output

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = runner.invoke(app, ["sft", str(_recipe(tmp_path, tiny_recipe, data={"sft": {"path": str(empty)}}))])
    assert result.exit_code == 2 and "is empty" in result.output

    wrong_type = write_jsonl(tmp_path / "types.jsonl", [{"prompt": "q", "completion": "a"},
                                                        {"prompt": "q", "completion": ""}])
    result = runner.invoke(app, ["sft", str(_recipe(tmp_path, tiny_recipe, data={"sft": {"path": str(wrong_type)}}))])
    assert result.exit_code == 2 and "row 1: column 'completion' must be" in result.output
    assert not (tmp_path / "run").exists()


def test_data_that_is_not_utf8_exits_2_with_the_file_the_line_and_the_fix(tmp_path, tiny_recipe):
    data = tmp_path / "demos.jsonl"
    data.write_bytes(b'{"prompt": "q", "completion": "a"}\n{"prompt": "caf\xe9", "completion": "a"}\n')
    result = runner.invoke(app, ["sft", str(_recipe(tmp_path, tiny_recipe, data={"sft": {"path": str(data)}}))])
    assert result.exit_code == 2, result.output
    assert f"SFT dataset file '{data}' is not UTF-8 text: line 2" in result.output
    assert "fix: re-save it as UTF-8" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_no_sft_data_section(tmp_path, tiny_recipe):
    result = runner.invoke(app, ["sft", str(_recipe(tmp_path, tiny_recipe))])
    assert result.exit_code == 2 and "has no data.sft section" in result.output


def test_model_that_is_not_there(tmp_path, tiny_recipe):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    raw = tiny_recipe(data={"sft": {"path": str(data)}})
    raw["model"]["name"] = str(tmp_path / "no-such-model")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["sft", str(path)])
    assert result.exit_code == 2 and "no-such-model' does not exist" in result.output
    raw["model"]["name"] = "nobody-here/not-a-model"
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["sft", str(path)])
    assert result.exit_code == 2
    assert "cannot load model 'nobody-here/not-a-model'" in result.output and "fix:" in result.output


def test_sft_then_generate_through_the_cli(tmp_path, tiny_recipe):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": "Hello there"}] * 4)
    recipe = _recipe(tmp_path, tiny_recipe, data={"sft": {"path": str(data)}}, sft={"max_steps": 2})
    result = runner.invoke(app, ["sft", str(recipe), "--set", "lora.r=4"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run" / "sft"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4  # --set reached the adapter
    assert yaml.safe_load((out / "recipe.yaml").read_text())["lora"]["r"] == 4
    result = runner.invoke(app, ["generate", "Hi", "--adapter", str(out), "-n", "5"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() != ""
