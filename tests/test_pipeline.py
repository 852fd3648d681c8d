"""`lora-rlhf pipeline`: stage order, skip-when-complete, --force, and the demo end to end (slow)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import quick_overrides
from typer.testing import CliRunner

from lora_rlhf.errors import RecipeError
from lora_rlhf.recipe.config import STAGES, load_recipe, recipe_from_dict
from lora_rlhf.stages.pipeline import is_complete, run_pipeline, with_pipeline_defaults
from lora_rlhf.stages.registry import REGISTRY
from lora_rlhf.stages.stage import StageResult
from lora_rlhf_cli.main import app

runner = CliRunner()


def test_reward_reads_compare_rankings_by_default(tmp_path):
    recipe = with_pipeline_defaults(recipe_from_dict({"output_dir": str(tmp_path)}))
    assert recipe.data.reward.path == str(tmp_path / "compare" / "rankings.jsonl")
    assert recipe.data.reward.eval_fraction == 0.1


def test_dpo_reads_the_same_rankings_unless_data_dpo_says_otherwise(tmp_path):
    from lora_rlhf.stages.dpo import dpo_dataset_config

    stages = {"pipeline": {"stages": ["data", "sft", "compare", "reward", "dpo", "eval"]}}
    recipe = with_pipeline_defaults(recipe_from_dict({"output_dir": str(tmp_path), **stages}))
    assert dpo_dataset_config(recipe) == recipe.data.reward  # compare's rankings, the same held-out prompts
    own = with_pipeline_defaults(recipe_from_dict({"output_dir": str(tmp_path), **stages,
                                                   "data": {"dpo": {"path": "prefs.jsonl"}}}))
    assert dpo_dataset_config(own).path == "prefs.jsonl"


def test_ppo_ptx_stage_without_ptx_settings_fails_before_any_stage_runs(tmp_path):
    recipe = recipe_from_dict({"output_dir": str(tmp_path / "run"), "pipeline": {"stages": ["sft", "ppo-ptx"]}})
    with pytest.raises(RecipeError, match="'ppo-ptx' needs ppo.ptx_coef > 0 and a data.ptx dataset"):
        run_pipeline(recipe)
    assert not (tmp_path / "run").exists()


def test_unknown_force_stage(tmp_path):
    with pytest.raises(RecipeError, match="--force: unknown stage 'rm'"):
        run_pipeline(recipe_from_dict({"output_dir": str(tmp_path)}), force=["rm"])


def test_complete_stages_are_skipped_and_force_reruns(tmp_path, monkeypatch):
    """Completion is the stage's own marker; the pipeline runs exactly the incomplete or forced stages."""
    ran = []

    def fake_run(stage):
        def run(recipe, *, resume=None):
            ran.append(stage)
            folder = recipe.stage_dir(stage)
            folder.mkdir(parents=True, exist_ok=True)
            adapter = ["adapter_config.json", "adapter_model.safetensors", "lora_rlhf.json"]
            names = {"sft": adapter, "dpo": adapter, "reward": [*adapter, "head.safetensors"],
                     "eval": ["results.json"]}[stage]
            for name in names:
                (folder / name).write_text("{}")
            return StageResult(stage, folder)

        return run

    for stage in ("sft", "reward", "dpo", "eval"):
        monkeypatch.setitem(REGISTRY, stage, dataclasses.replace(REGISTRY[stage], run=fake_run(stage)))
    recipe = recipe_from_dict({"output_dir": str(tmp_path),
                               "pipeline": {"stages": ["sft", "reward", "dpo", "eval"]}})
    results = run_pipeline(recipe)
    assert ran == ["sft", "reward", "dpo", "eval"] and [r.output for r in results] == [
        tmp_path / s for s in ran]
    ran.clear()
    results = run_pipeline(recipe)
    assert ran == [] and all(r.skipped for r in results)
    (tmp_path / "reward" / "lora_rlhf.json").unlink()  # an interrupted reward stage
    (tmp_path / "dpo" / "lora_rlhf.json").unlink()  # and an interrupted DPO stage
    run_pipeline(recipe, force=["eval"])
    assert ran == ["reward", "dpo", "eval"]
    assert is_complete(recipe, "reward") and is_complete(recipe, "dpo")


def test_every_stage_is_registered_once_and_the_pipeline_names_none():
    """The pipeline runs stages only through the registry: it imports no stage module."""
    import ast

    from lora_rlhf.stages import pipeline

    assert list(REGISTRY) == list(STAGES)
    tree = ast.parse(Path(pipeline.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {m for m in imported if m.startswith("lora_rlhf.stages")} == {"lora_rlhf.stages.registry",
                                                                          "lora_rlhf.stages.stage"}


def test_a_compare_stage_without_a_labeler_fails_before_any_stage_runs_unless_it_is_complete(tmp_path):
    recipe = recipe_from_dict({"output_dir": str(tmp_path / "run"), "pipeline": {"stages": ["sft", "compare"]}})
    with pytest.raises(RecipeError, match="'compare' needs compare.labeler"):
        run_pipeline(recipe)
    assert not (tmp_path / "run").exists()
    (tmp_path / "run" / "compare").mkdir(parents=True)
    (tmp_path / "run" / "compare" / "rankings.jsonl").write_text("{}\n")  # ranked by hand: nothing to check
    (tmp_path / "run" / "sft").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "lora_rlhf.json"):
        (tmp_path / "run" / "sft" / name).write_text("{}")
    assert all(r.skipped for r in run_pipeline(recipe))


@pytest.mark.slow
def test_demo_pipeline_end_to_end_quick_variant(tmp_path):
    """The demo recipe with tiny sizes on the embedded 135M model: every stage, then a resume that skips all."""
    out = tmp_path / "demo"
    args = ["pipeline", "recipes/demo_smollm2_cpu.yaml"] + [a for o in quick_overrides(out) for a in ("--set", o)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    for path in ("data/sft.jsonl", "sft/lora_rlhf.json", "compare/candidates.jsonl", "compare/rankings.jsonl",
                 "reward/lora_rlhf.json", "reward/head.safetensors", "ppo/policy/lora_rlhf.json",
                 "ppo/value/head.safetensors", "ppo-ptx/policy/adapter_model.safetensors", "eval/report.md",
                 "eval/results.json"):
        assert (out / path).is_file(), path
    results = json.loads((out / "eval" / "results.json").read_text())
    report = (out / "eval" / "report.md").read_text()
    for policy in ("base", "sft", "ppo", "ppo-ptx"):
        assert policy in json.dumps(results), policy
        assert re.search(rf"^\|\s*{re.escape(policy)}\s*\|", report, re.M), policy
    ptx_recipe = yaml.safe_load((out / "ppo-ptx" / "recipe.yaml").read_text())
    assert ptx_recipe["ppo"]["ptx_coef"] > 0
    assert yaml.safe_load((out / "ppo" / "recipe.yaml").read_text())["ppo"]["ptx_coef"] == 0

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("skipped") == 7, again.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps  # nothing rewritten
    assert load_recipe("recipes/demo_smollm2_cpu.yaml").output_dir == "runs/demo"
