"""The demo's data builder: disjoint train/eval prompts, unseen topics and phrasings held out, deterministic
files, general text split by module, and best-of-n demonstrations filtered by the checker."""

from __future__ import annotations

import json

import pytest

from lora_rlhf.core.base import SharedBase
from lora_rlhf.recipe.config import ModelConfig, QuantizationConfig
from lora_rlhf.tasks import demo_data, ifeval_lite


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return demo_data.build(out, seed=7, n_train=200, n_eval=60, n_ptx=80, n_general=30)


def _phrasing_kinds(prompt: str) -> set[bool]:
    """Which pools (seen=True / unseen=False) the constraint sentences of `prompt` come from."""
    kinds = set()
    for templates in ifeval_lite.PHRASINGS.values():
        for template, seen in templates:
            if ifeval_lite._template_regex(template).search(prompt):
                kinds.add(seen)
    return kinds


def test_files_and_columns(built):
    assert set(built) == {"prompts_train", "prompts_eval", "ptx", "general_eval"}
    train, evaluation = read(built["prompts_train"]), read(built["prompts_eval"])
    assert len(train) == 200 and len(evaluation) == 60
    assert all(set(r) >= {"id", "prompt", "topic", "constraints", "split_kind"} for r in train + evaluation)
    assert len(read(built["ptx"])) == 80 and len(read(built["general_eval"])) == 30
    assert all(isinstance(r["text"], str) and len(r["text"].split()) >= 25 for r in read(built["ptx"]))


def test_constraints_field_matches_what_the_checker_reads_from_the_text(built):
    for row in read(built["prompts_train"]) + read(built["prompts_eval"]):
        assert ifeval_lite.parse_constraints(row["prompt"]) == row["constraints"]
        types = [c["type"] for c in row["constraints"]]
        assert len(types) in (1, 2)
        if len(types) == 2:
            assert ifeval_lite.compatible(*types)


def test_train_and_eval_are_disjoint_and_unseen_rows_are_really_unseen(built):
    train, evaluation = read(built["prompts_train"]), read(built["prompts_eval"])
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    assert len({r["prompt"] for r in train}) == len(train)
    train_topics = {r["topic"] for r in train}
    assert {r["split_kind"] for r in evaluation} == {"seen", "unseen"}
    for row in train:
        assert _phrasing_kinds(row["prompt"]) == {True}
    for row in evaluation:
        if row["split_kind"] == "unseen":
            assert row["topic"] not in train_topics
            assert _phrasing_kinds(row["prompt"]) == {False}
        else:
            assert row["topic"] in set(demo_data.TOPICS[:-demo_data.EVAL_ONLY_TOPICS])
            assert _phrasing_kinds(row["prompt"]) == {True}
    assert len(set(demo_data.TOPICS)) == len(demo_data.TOPICS)


def test_general_text_is_split_by_module_so_held_out_text_is_never_trained_on(built):
    ptx = {r["text"] for r in read(built["ptx"])}
    held = {r["text"] for r in read(built["general_eval"])}
    assert not ptx & held
    by_module = demo_data.stdlib_paragraphs()
    module_of = {p: m for m, ps in by_module.items() for p in ps}
    assert not {module_of[p] for p in ptx} & {module_of[p] for p in held}


def test_same_seed_same_bytes_other_seed_other_prompts(built, tmp_path):
    again = demo_data.build(tmp_path / "a", seed=7, n_train=200, n_eval=60, n_ptx=80, n_general=30)
    for name, path in built.items():
        assert again[name].read_bytes() == path.read_bytes(), name
    other = demo_data.build(tmp_path / "b", seed=8, n_train=200, n_eval=60, n_ptx=80, n_general=30)
    assert other["prompts_train"].read_bytes() != built["prompts_train"].read_bytes()


def test_asking_for_more_distinct_prompts_than_exist_is_an_error():
    import random

    rng = random.Random(0)
    three = lambda: {"prompt": rng.choice("abc")}  # noqa: E731 - a pool of three prompts
    rows, _ = demo_data._unique(rng, 3, three, set(), "train")
    assert sorted(r["prompt"] for r in rows) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="only 3 distinct train prompts"):
        demo_data._unique(rng, 4, three, set(), "train")


def test_best_of_prefers_compliance_then_soft_credit_and_repairs_when_nothing_complies():
    prompt = "Describe snow. Avoid commas entirely. Answer in fewer than 8 words."
    samples = ["Snow is cold, white and soft to touch.",      # comma, 8 words: 0/2
               "Snow is cold and white and soft.",             # 2/2
               "Snow is cold, white."]                         # comma: 1/2
    best = demo_data.best_of(prompt, samples)
    assert best == {"completion": samples[1], "compliance": 1.0, "repaired": False}
    fixed = demo_data.best_of(prompt, [samples[0], samples[2]])
    assert fixed["repaired"] and ifeval_lite.score(prompt, fixed["completion"]) == 1.0
    unrepaired = demo_data.best_of(prompt, [samples[0], samples[2]], allow_repair=False)
    assert unrepaired == {"completion": samples[2], "compliance": 0.5, "repaired": False}
    # Too short to repair into an answer: dropped.
    assert demo_data.best_of(prompt, ["No."]) is None


def test_constraint_types_limit_every_prompt_train_and_eval():
    types = ("max_words", "keyword", "no_commas")
    train, evaluation = demo_data.build_prompts(seed=3, n_train=120, n_eval=40, types=types)
    used = {spec["type"] for row in train + evaluation for spec in row["constraints"]}
    assert used == set(types)  # every allowed type drawn, nothing else
    for row in train + evaluation:
        assert [s["type"] for s in ifeval_lite.parse_constraints(row["prompt"])] == [
            s["type"] for s in row["constraints"]]
    # None means every type: the same draw as leaving the argument out.
    assert demo_data.build_prompts(seed=3, n_train=5, n_eval=2, types=None) == demo_data.build_prompts(3, 5, 2)
    with pytest.raises(ValueError, match="not known"):
        demo_data.build_prompts(seed=3, n_train=5, n_eval=2, types=("max_words", "haiku"))


def test_build_demonstrations_samples_n_per_prompt_and_writes_prompt_completion(tiny_model_dir, tmp_path):
    shared = SharedBase.load(ModelConfig(name=str(tiny_model_dir), device="cpu"), QuantizationConfig(mode="none"),
                             for_training=False)
    train, _ = demo_data.build_prompts(seed=1, n_train=3, n_eval=2)
    prompts = [r["prompt"] for r in train]
    rows = demo_data.build_demonstrations(shared, prompts, n=2, out_path=tmp_path / "sft.jsonl", max_new_tokens=12)
    written = read(tmp_path / "sft.jsonl")
    assert written == rows
    # The tiny random model rarely complies: whatever is kept is fully compliant (sampled or repaired).
    assert len(rows) <= len(prompts)
    for row in rows:
        assert row["prompt"] in prompts
        assert row["compliance"] == 1.0 and ifeval_lite.score(row["prompt"], row["completion"]) == 1.0
    assert demo_data.demonstration_stats(rows, len(prompts))["prompts"] == 3
