"""Recipe validation: unknown keys, types, every problem at once, --set overrides, the resolved recipe."""

from __future__ import annotations

import pytest
import yaml

from lora_rlhf.errors import RecipeError
from lora_rlhf.recipe.config import (
    TRAINER_DEFAULTS,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    save_recipe,
)


def test_defaults_use_the_embedded_model_in_4bit():
    recipe = recipe_from_dict({})
    assert recipe.model.name == "smollm2-135m-instruct"
    assert recipe.quantization.mode == "4bit"
    assert recipe.lora.target_modules == "all-linear"


def test_unknown_key_suggests_the_close_name_and_lists_valid_ones():
    with pytest.raises(RecipeError, match=r"unknown key 'lora.rank'.*valid keys: alpha, bias, dropout, r, target_modules"):
        recipe_from_dict({"lora": {"rank": 8}})
    with pytest.raises(RecipeError, match=r"unknown key 'modle' \(did you mean 'model'\?\)"):
        recipe_from_dict({"modle": {}})


def test_every_problem_is_reported_at_once():
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({
            "modle": {},
            "lora": {"r": "eight"},
            "quantization": {"mode": "3bit"},
            "sft": {"learnin_rate": 1e-4},
            "data": {"sft": {"pth": "x.jsonl"}},
        })
    problems = info.value.problems
    assert len(problems) == 6, problems
    text = str(info.value)
    assert "6 problems" in text
    assert "'lora.r' must be an integer, got 'eight'" in text
    assert "'quantization.mode' must be one of '4bit', '8bit', 'none', got '3bit'" in text
    assert "unknown key 'sft.learnin_rate' (did you mean 'learning_rate'?)" in text
    assert "missing required key 'data.sft.path'" in text


def test_trainer_arguments_pass_through_and_are_type_checked():
    recipe = recipe_from_dict({"sft": {"learning_rate": 1e-4, "num_train_epochs": 3, "max_length": 256}})
    # resolved at load: the recipe's values over our defaults
    assert recipe.trainer_args["sft"] == {**TRAINER_DEFAULTS["sft"], "learning_rate": 1e-4, "num_train_epochs": 3.0,
                                          "max_length": 256}
    with pytest.raises(RecipeError, match=r"'sft.num_train_epochs' must be a number, got 'three'"):
        recipe_from_dict({"sft": {"num_train_epochs": "three"}})
    with pytest.raises(RecipeError, match=r"unknown key 'sft.output_dir'"):
        recipe_from_dict({"sft": {"output_dir": "elsewhere"}})  # set by us from the top-level output_dir


def test_dpo_section_passes_dpo_config_arguments_through_and_checks_ours():
    recipe = recipe_from_dict({"dpo": {"pairs": "best_vs_rest", "sft_adapter": "runs/x/sft", "beta": 0.2,
                                       "loss_type": "ipo", "precompute_ref_log_probs": True}})
    assert (recipe.dpo.pairs, recipe.dpo.sft_adapter) == ("best_vs_rest", "runs/x/sft")
    # one loss name, as TRL's DPOConfig takes it, becomes its list form
    assert recipe.trainer_args["dpo"] == {**TRAINER_DEFAULTS["dpo"], "beta": 0.2, "loss_type": ["ipo"]}
    assert recipe_to_dict(recipe)["dpo"]["loss_type"] == ["ipo"]
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"dpo": {"pairs": "best", "beta": 0, "loss_type": ["sigmoid", "ipoo"], "betta": 1}})
    text = str(info.value)
    assert "'dpo.pairs' must be one of 'all', 'best_vs_rest', got 'best'" in text
    assert "dpo.beta must be > 0, got 0" in text
    assert "'dpo.loss_type' has unknown loss 'ipoo' (did you mean 'ipo'?)" in text
    assert "unknown key 'dpo.betta' (did you mean 'beta'?)" in text and "any DPOConfig argument" in text


def test_dpo_loss_types_are_the_ones_trl_knows():
    """DPOTrainer refuses an unknown loss only at the first step; the recipe refuses it up front from our copy of
    TRL's list, which must stay the same list."""
    import dataclasses
    import re

    from trl import DPOConfig

    from lora_rlhf.recipe.config import DPO_LOSS_TYPES

    help_text = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata["help"]
    listed = help_text.split("Possible values are:")[1].split(". If")[0]
    assert tuple(re.findall(r"'(\w+)'", listed)) == DPO_LOSS_TYPES


def test_cross_field_checks():
    with pytest.raises(RecipeError, match=r"batch_size \(6\) must be a multiple of num_mini_batches \(4\)"):
        recipe_from_dict({"ppo": {"batch_size": 6, "num_mini_batches": 4}})
    with pytest.raises(RecipeError, match=r"eval_fraction must be in \[0, 1\)"):
        recipe_from_dict({"data": {"sft": {"path": "x.jsonl", "eval_fraction": 1.5}}})


def test_set_overrides_are_parsed_as_yaml_and_validated():
    recipe = recipe_from_dict({"lora": {"r": 8}}, ["lora.r=32", "ppo.kl_coef=0.2", "data.sft.path=d.jsonl",
                                                   "sft.learning_rate=3e-4", "lora.target_modules=[q_proj, v_proj]"])
    assert recipe.lora.r == 32
    assert recipe.ppo.kl_coef == 0.2
    assert recipe.data.sft.path == "d.jsonl"
    assert recipe.trainer_args["sft"]["learning_rate"] == 3e-4
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(RecipeError, match=r"unknown key 'lora.rr' \(did you mean 'r'\?\)"):
        recipe_from_dict({}, ["lora.rr=4"])
    with pytest.raises(RecipeError, match=r"--set 'lora' must look like section.key=value"):
        recipe_from_dict({}, ["lora"])


def test_resolved_recipe_round_trips(tmp_path):
    recipe = recipe_from_dict({"seed": 7, "sft": {"learning_rate": 1e-4}, "lora": {"r": 4}})
    save_recipe(recipe, tmp_path / "resolved.yaml")
    again = load_recipe(tmp_path / "resolved.yaml")
    assert recipe_to_dict(again) == recipe_to_dict(recipe)
    saved = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert saved["sft"]["learning_rate"] == 1e-4 and saved["lora"]["r"] == 4 and saved["seed"] == 7


def test_the_saved_recipe_holds_every_default_and_derives_what_follows_from_other_settings(tmp_path):
    recipe = recipe_from_dict({"sft": {"num_train_epochs": 2}})
    save_recipe(recipe, tmp_path / "resolved.yaml")
    saved = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    # defaults the recipe did not name are written out: a later reader sees the run's learning rate
    assert saved["sft"]["learning_rate"] == TRAINER_DEFAULTS["sft"]["learning_rate"] == 2e-4
    assert saved["sft"]["num_train_epochs"] == 2 and saved["reward"]["learning_rate"] == 1e-4
    assert saved["dpo"]["precompute_ref_log_probs"] is True and saved["eval"]["general_max_tokens"] == 256
    again = load_recipe(tmp_path / "resolved.yaml", ["model.gradient_checkpointing=true"])
    assert again.trainer_args == recipe.trainer_args
    # gradient checkpointing is derived, not stored in the sections: --set on a saved recipe still reaches them
    assert "gradient_checkpointing" not in saved["sft"] and again.gradient_checkpointing("sft")
    assert not recipe_from_dict({"model": {"gradient_checkpointing": True}, "sft": {"gradient_checkpointing": False}}
                                ).gradient_checkpointing("sft")


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(listy)


def test_relative_data_paths_are_read_from_the_recipe_folder(tmp_path):
    (tmp_path / "demos.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "r.yaml").write_text("data:\n  sft:\n    path: demos.jsonl\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.data.sft.path == str((tmp_path / "demos.jsonl").resolve())


@pytest.mark.parametrize("overrides, message", [
    (["sft.per_device_train_batch_size=0"], "sft.per_device_train_batch_size must be > 0, got 0"),
    (["reward.learning_rate=-1e-4"], "reward.learning_rate must be >= 0"),
    (["sft.max_length=0"], "sft.max_length must be > 0"),
    (["sft.num_train_epochs=-1"], "sft.num_train_epochs must be >= 0"),
    (["sft.max_steps=0"], "sft.max_steps must be > 0 (or -1: use num_train_epochs), got 0"),
    (["lora.dropout=1.0"], "dropout must be in [0, 1), got 1.0"),
    (["lora.alpha=-8"], "lora.alpha must be > 0 (the update is scaled by alpha / r), got -8"),
    (["ppo.kl_coef=.nan"], "kl_coef must be a finite number"),
    (["ppo.temperature=.inf"], "temperature must be a finite number"),
    (["ppo.cliprange=-0.2"], "cliprange must be >= 0, got -0.2"),
    (["ppo.lam=1.5"], "lam must be in [0, 1], got 1.5"),
    (["ppo.gamma=-0.1"], "gamma must be in [0, 1], got -0.1"),
    (["ppo.batch_size=0"], "ppo.batch_size must be > 0, got 0"),
    (["compare.batch_size=0"], "compare.batch_size must be > 0, got 0"),
    (["compare.max_new_tokens=-1"], "compare.max_new_tokens must be > 0, got -1"),
    (["compare.temperature=-0.5"], "compare.temperature must be > 0 (compare samples k different responses), got -0.5"),
    (["compare.top_p=1.5"], "compare.top_p must be in [0, 1], got 1.5"),
    (["compare.k=1"], "compare.k must be >= 2 (a ranking compares responses), got 1"),
    (["eval.batch_size=0"], "eval.batch_size must be > 0, got 0"),
    (["eval.max_new_tokens=-1"], "eval.max_new_tokens must be > 0, got -1"),
    (["eval.temperature=-1"], "eval.temperature must be >= 0, got -1"),
    (["eval.temperature=.inf"], "eval.temperature must be a finite number, got inf"),
    (["eval.num_samples=-2"], "eval.num_samples must be >= 0, got -2"),
    (["eval.general_max_texts=0"], "eval.general_max_texts must be > 0, got 0"),
    (["data.sft.path=x.jsonl", "data.sft.max_samples=0"], "data.sft.max_samples must be > 0, got 0"),
    (["data.sft.path=x.jsonl", "data.sft.eval_fraction=.nan"], "data.sft.eval_fraction must be a finite number"),
    (["seed=-1"], "seed must be in [0, 4294967295], got -1"),
    (["pipeline.reward_eval_fraction=1"], "pipeline.reward_eval_fraction must be in [0, 1), got 1"),
    (["sft.weight_decay=.inf"], "sft.weight_decay must be a finite number"),
])
def test_out_of_range_values_are_refused_with_the_recipe_problems(overrides, message):
    """Values TRL or PyTorch would reject only once training runs (or never) fail at recipe load: before a model
    loads or an output folder is touched."""
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({}, overrides)
    assert message in str(e.value)


def test_compare_and_eval_report_every_bad_value_at_once():
    """compare reported only its first problem (k), and eval none: a batch size of 0 or a negative temperature
    crashed after the model had loaded, and eval.temperature inf ran to the end with random tokens."""
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"compare": {"k": 1, "batch_size": 0, "max_new_tokens": -1, "temperature": -1.0},
                          "eval": {"batch_size": 0, "temperature": float("inf"), "top_p": -0.1}})
    assert sorted(e.value.problems) == sorted([
        "compare.k must be >= 2 (a ranking compares responses), got 1",
        "compare.batch_size must be > 0, got 0",
        "compare.max_new_tokens must be > 0, got -1",
        "compare.temperature must be > 0 (compare samples k different responses), got -1.0",
        "eval.batch_size must be > 0, got 0",
        "eval.temperature must be a finite number, got inf",
        "eval.top_p must be in [0, 1], got -0.1",
    ])


def test_a_range_problem_is_reported_once_and_cross_field_checks_still_run():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"ppo": {"num_mini_batches": 0, "batch_size": 6, "num_generations": 4, "kl_coef": -1}})
    assert sorted(e.value.problems) == sorted([
        "ppo.num_mini_batches must be > 0, got 0",
        "ppo.kl_coef must be >= 0, got -1.0",
        "ppo: batch_size (6) must be a multiple of num_generations (4): every prompt of a step gets all its samples",
    ])


def test_sane_values_still_pass():
    recipe = recipe_from_dict({}, ["sft.max_steps=-1", "sft.learning_rate=0", "lora.dropout=0", "ppo.lam=1",
                                   "ppo.gamma=0", "reward.num_train_epochs=0.5", "eval.temperature=0",
                                   "eval.num_samples=0", "compare.k=2", "compare.top_p=0"])
    assert recipe.lora.dropout == 0 and recipe.ppo.lam == 1


def test_duplicate_yaml_keys_are_reported_with_their_lines(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("ppo:\n  kl_coef: 0.1\n  cliprange: 0.2\n  kl_coef: 0.5\n")
    with pytest.raises(RecipeError, match=r"duplicate key 'kl_coef' \(line 4; first on line 2\)"):
        load_recipe(path)


def test_a_recipe_that_is_not_utf8_is_one_clear_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("ppo: {kl_coef: 0.1}  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8 text .*save the recipe as UTF-8"):
        load_recipe(path)
