"""`compare`: K samples per prompt -> candidates.jsonl, ranked by a function or a reward adapter -> rankings.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import Stop, make_reward_adapter, recipe_dict, write_jsonl
from typer.testing import CliRunner

from lora_rlhf.core.base import SharedBase
from lora_rlhf.core.scoring import score_texts
from lora_rlhf.errors import ModelError, RecipeError
from lora_rlhf.recipe.config import recipe_from_dict
from lora_rlhf.stages.compare import run_compare
from lora_rlhf.stages.labelers import normalize_judgement
from lora_rlhf.stages.reward import load_reward_data

LABELER = '''
def by_length(prompt, responses):
    return [len(r) + i / 10 for i, r in enumerate(responses)]  # distinct: never all tied

def reversed_order(prompt, responses):
    return {"order": list(range(len(responses)))[::-1]}

def wrong_length(prompt, responses):
    return [1.0]
'''


@pytest.fixture
def setup(tiny_recipe, tmp_path):
    (tmp_path / "labeler.py").write_text(LABELER)
    write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": "Hi there", "meta": {"src": 1}},
                                             {"id": "b", "prompt": [{"role": "user", "content": "Name a fruit."}]},
                                             {"id": "c", "prompt": "Count to three"}])

    def make(labeler: str | None = None, **compare) -> object:
        raw = tiny_recipe("none", data={"prompts": {"path": str(tmp_path / "prompts.jsonl")}},
                          compare={"k": 3, "max_new_tokens": 4, "batch_size": 2, "labeler": labeler, **compare})
        return recipe_from_dict(raw)

    return make, tmp_path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_candidates_and_function_rankings(setup):
    make, tmp = setup
    recipe = make(f"{tmp / 'labeler.py'}:by_length")
    out = run_compare(recipe, progress=False)
    candidates = read_jsonl(out / "candidates.jsonl")
    assert [c["id"] for c in candidates] == ["a", "b", "c"]
    assert all(len(c["responses"]) == 3 and all(isinstance(r, str) for r in c["responses"]) for c in candidates)
    assert candidates[0]["meta"] == {"src": 1}  # extra keys carried along
    assert candidates[1]["prompt"] == [{"role": "user", "content": "Name a fruit."}]
    rankings = read_jsonl(out / "rankings.jsonl")
    for c, r in zip(candidates, rankings, strict=True):
        assert r["responses"] == c["responses"]
        assert r["scores"] == [len(x) + i / 10 for i, x in enumerate(c["responses"])]
        assert r["labeler"].endswith(":by_length")
    # The rankings feed the reward stage as they are: 3 prompts x 3 pairs.
    comparisons, _ = load_reward_data(recipe_from_dict({"data": {"reward": {"path": str(out / "rankings.jsonl")}}})
                                      .data.reward)
    assert len(comparisons) == 9


def test_preflight_is_sized_by_the_longest_prompt_before_loading(setup, monkeypatch):
    from lora_rlhf.core.loading import load_tokenizer
    from lora_rlhf.core.text import prompt_ids
    from lora_rlhf.stages import compare as compare_stage

    make, _ = setup
    seen = {}

    def planned(recipe, stage, sequence_length=None, prompt_length=None):
        seen.update(stage=stage, prompt_length=prompt_length)
        raise Stop

    monkeypatch.setattr(compare_stage, "check_memory", planned)
    recipe = make()
    with pytest.raises(Stop):
        run_compare(recipe, progress=False)
    tokenizer = load_tokenizer(recipe.model)
    prompts = ["Hi there", [{"role": "user", "content": "Name a fruit."}], "Count to three"]
    assert seen == {"stage": "compare", "prompt_length": max(len(prompt_ids(tokenizer, p)) for p in prompts)}
    assert not recipe.stage_dir("compare").exists()


def test_the_same_recipe_and_seed_sample_the_same_candidates(setup):
    """compare seeds its sampling from the recipe: a second run in the same process (whose random state has moved
    on) writes the same candidates, and another seed writes others."""
    make, _ = setup
    recipe = make(max_new_tokens=8)
    first = (run_compare(recipe, progress=False) / "candidates.jsonl").read_text()
    torch.rand(7)  # whatever ran in between
    assert (run_compare(recipe, progress=False) / "candidates.jsonl").read_text() == first
    recipe.seed += 1
    assert (run_compare(recipe, progress=False) / "candidates.jsonl").read_text() != first


def test_a_rerun_keeps_earlier_rankings_and_never_leaves_them_beside_new_candidates(setup):
    """Rankings can be people's work (`lora-rlhf label` writes the same format): a rerun moved nowhere deleted them.
    Each rerun over a finished run keeps it whole in previous-N; a rerun without a labeler is not complete."""
    make, tmp = setup
    recipe = make()
    out = recipe.stage_dir("compare")
    out.mkdir(parents=True)
    human = '{"id": "a", "prompt": "Hi there", "responses": ["x", "y"], "ranks": [2, 1], "labeler": "alice"}\n'
    (out / "rankings.jsonl").write_text(human)
    (out / "candidates.jsonl").write_text('{"id": "a", "prompt": "Hi there", "responses": ["x", "y"]}\n')
    run_compare(recipe, progress=False)  # no labeler: new candidates, no rankings
    assert not (out / "rankings.jsonl").exists()  # not complete: the pipeline reruns the stage
    assert (out / "previous-1" / "rankings.jsonl").read_text() == human
    assert "x" in (out / "previous-1" / "candidates.jsonl").read_text()
    assert len(read_jsonl(out / "candidates.jsonl")) == 3
    run_compare(make(f"{tmp / 'labeler.py'}:by_length"), progress=False)
    machine = (out / "rankings.jsonl").read_text()
    run_compare(make(f"{tmp / 'labeler.py'}:reversed_order"), progress=False)
    assert (out / "previous-2" / "rankings.jsonl").read_text() == machine
    assert (out / "previous-1" / "rankings.jsonl").read_text() == human  # an older backup is never overwritten
    assert all(r["ranks"][0] > r["ranks"][-1] for r in read_jsonl(out / "rankings.jsonl"))


def test_order_labeler_and_judgement_checks(setup):
    make, tmp = setup
    out = run_compare(make(f"{tmp / 'labeler.py'}:reversed_order", k=2), progress=False)
    assert all(r["ranks"] == [2, 1] for r in read_jsonl(out / "rankings.jsonl"))
    assert normalize_judgement([0.5, 0.5], 2, "x") == {"scores": [0.5, 0.5], "skipped": True}  # all tied
    assert normalize_judgement({"ranks": [2, 1, 3]}, 3, "x") == {"ranks": [2, 1, 3]}
    with pytest.raises(RecipeError, match="exactly one of 'scores', 'ranks' or 'order'"):
        normalize_judgement({"ranks": [1, 2], "scores": [1, 2]}, 2, "x")


def test_broken_labeler_stops_before_writing(setup):
    make, tmp = setup
    recipe = make(f"{tmp / 'labeler.py'}:wrong_length")
    with pytest.raises(RecipeError, match="must give 3 finite numbers"):
        run_compare(recipe, progress=False)
    assert not recipe.stage_dir("compare").exists()
    recipe = make(f"{tmp / 'labeler.py'}:no_such_function")
    with pytest.raises(RecipeError, match="has no function 'no_such_function'"):
        run_compare(recipe, progress=False)
    assert not recipe.stage_dir("compare").exists()


def test_reward_adapter_labeler_ranks_by_its_scores(setup, tiny_model_dir):
    make, tmp = setup
    adapter = make_reward_adapter(tiny_model_dir, tmp / "rm", offset=0.25)
    recipe = make(str(adapter))
    out = run_compare(recipe, progress=False)
    rankings = read_jsonl(out / "rankings.jsonl")
    assert len(rankings) == 3  # one per prompt: the loop below must not pass by checking nothing
    shared = SharedBase.load(recipe.model, recipe.quantization, for_training=False)
    shared.load_adapter("reward", adapter)
    for r in rankings:
        expected = score_texts(shared, [r["prompt"]] * 3, r["responses"])
        torch.testing.assert_close(torch.tensor(r["scores"]), expected.cpu(), atol=1e-5, rtol=1e-5)


def test_reward_adapter_of_another_base_is_refused(setup, tiny_model_dir, other_tiny_model_dir):
    make, tmp = setup
    recipe = make(str(make_reward_adapter(tiny_model_dir, tmp / "rm")))
    recipe.model.name = str(other_tiny_model_dir)
    with pytest.raises(ModelError, match="fingerprint"):
        run_compare(recipe, progress=False)
    assert not recipe.stage_dir("compare").exists()


def test_cli_compare(setup, caplog):
    from lora_rlhf_cli.main import app

    make, tmp = setup
    raw = recipe_dict(make().model.name, tmp / "run", "none", cpu=True, lora={"r": 4, "alpha": 8},
                      data={"prompts": {"path": str(tmp / "prompts.jsonl")}},
                      compare={"k": 2, "max_new_tokens": 3, "labeler": f"{tmp / 'labeler.py'}:by_length"})
    (tmp / "r.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["compare", str(tmp / "r.yaml")])
    assert result.exit_code == 0, result.output
    assert "rankings.jsonl" in result.output and (tmp / "run" / "compare" / "rankings.jsonl").is_file()
    first = (tmp / "run" / "compare" / "rankings.jsonl").read_text()
    result = CliRunner().invoke(app, ["compare", str(tmp / "r.yaml"), "--set", "compare.max_new_tokens=5"])
    assert result.exit_code == 0, result.output
    kept = tmp / "run" / "compare" / "previous-1"
    assert f"moved to {kept}" in caplog.text  # the rerun says where the earlier rankings went (stderr, uncaptured)
    assert (kept / "rankings.jsonl").read_text() == first
    result = CliRunner().invoke(app, ["compare", str(tmp / "r.yaml"), "--set", "compare.k=1"])
    assert result.exit_code == 2 and "compare.k must be >= 2" in result.output
    result = CliRunner().invoke(app, ["compare", str(tmp / "r.yaml"), "--set", "data.prompts=null"])
    assert result.exit_code == 2 and "no data.prompts section" in result.output
