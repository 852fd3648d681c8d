"""IFEval-lite: every phrasing parses back to its constraint, every checker accepts and rejects what it should."""

from __future__ import annotations

import json

import pytest

from lora_rlhf.errors import DataError
from lora_rlhf.tasks import ifeval_lite as ife
from lora_rlhf.tasks.demo_data import PARAMS, build_prompts

SAMPLE_PARAMS = {"max_words": {"n": 40}, "end_with": {"phrase": "Have a nice day!"}, "start_with": {"word": "Sure"},
                 "bullets": {"n": 3}, "keyword": {"word": "nature"}}


def all_phrasings():
    for ctype, templates in ife.PHRASINGS.items():
        for i in range(len(templates)):
            yield ctype, i


@pytest.mark.parametrize(("ctype", "phrasing"), list(all_phrasings()))
def test_every_phrasing_round_trips(ctype, phrasing):
    spec = {"type": ctype, **SAMPLE_PARAMS.get(ctype, {})}
    sentence = ife.render(spec, phrasing)
    prompt = f"Describe volcanoes in a few sentences. {sentence}"
    assert ife.parse_constraints(prompt) == [spec]
    # Every parameter value the demo draws parses back too.
    for key, values in PARAMS.get(ctype, {}).items():
        for value in values:
            other = {**spec, key: value}
            assert ife.parse_constraints("Q? " + ife.render(other, phrasing)) == [other]


def test_each_type_has_seen_and_unseen_phrasings():
    for ctype, templates in ife.PHRASINGS.items():
        kinds = {seen for _, seen in templates}
        assert kinds == {True, False}, ctype


def test_two_constraints_parse_in_order_from_plain_chat_and_templated_prompts():
    a, b = {"type": "no_commas"}, {"type": "end_with", "phrase": "That is all."}
    text = f"Explain tides. {ife.render(a, 1)} {ife.render(b, 2)}"
    assert ife.parse_constraints(text) == [a, b]
    assert ife.parse_constraints([{"role": "system", "content": "Be nice."}, {"role": "user", "content": text}]) == [a, b]
    templated = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    assert ife.parse_constraints(templated) == [a, b]


def test_no_phrasing_matches_another_types_text():
    # A sentence of one type must not also be read as a constraint of another type.
    for ctype, i in all_phrasings():
        spec = {"type": ctype, **SAMPLE_PARAMS.get(ctype, {})}
        assert [s["type"] for s in ife.parse_constraints(ife.render(spec, i))] == [ctype]


LONG = "Volcanoes form where magma rises through the crust and erupts as lava and ash"  # 14 words

CASES = [
    # (spec, response, met)
    ({"type": "lowercase"}, "volcanoes are openings in the crust.", True),
    ({"type": "lowercase"}, "Volcanoes are openings in the crust.", False),
    ({"type": "uppercase"}, "VOLCANOES ARE OPENINGS, 2 KM DEEP.", True),
    ({"type": "uppercase"}, "VOLCANOES ARE openings.", False),
    ({"type": "max_words", "n": 15}, LONG + ".", True),
    ({"type": "max_words", "n": 14}, LONG + ".", False),
    ({"type": "end_with", "phrase": "That is all."}, "Lava is hot. That is all.", True),
    ({"type": "end_with", "phrase": "That is all."}, "Lava is hot. That is all.\n", True),
    ({"type": "end_with", "phrase": "That is all."}, "Lava is hot. that is all.", True),  # IFEval lowercases
    ({"type": "end_with", "phrase": "That is all."}, "That is all. Lava is hot.", False),
    ({"type": "end_with", "phrase": "That is all."}, "Lava is hot. That is all", False),
    ({"type": "no_commas"}, "Lava is hot and bright.", True),
    ({"type": "no_commas"}, "Lava is hot, and bright.", False),
    ({"type": "quoted"}, '"Lava is very hot."', True),
    ({"type": "quoted"}, '"Lava is very hot.', False),
    ({"type": "quoted"}, "Lava is very hot.", False),
    ({"type": "start_with", "word": "Sure"}, "Sure! Lava is hot.", True),
    ({"type": "start_with", "word": "Sure"}, '"sure, lava is hot."', True),
    ({"type": "start_with", "word": "Sure"}, "Of course, sure, lava is hot.", False),
    ({"type": "start_with", "word": "Sure"}, "Surely lava is hot.", False),
    ({"type": "bullets", "n": 2}, "Facts:\n* Lava is hot.\n* Ash is grey.", True),
    ({"type": "bullets", "n": 2}, "- Lava is hot.\n- Ash is grey.", True),
    ({"type": "bullets", "n": 3}, "* Lava is hot.\n* Ash is grey.", False),
    ({"type": "bullets", "n": 2}, "* Lava is hot.\n* Ash is grey.\n* Rock is hard.", False),
    ({"type": "bullets", "n": 2}, "Lava is hot *and* ash is grey - really.", False),
    ({"type": "json"}, '{"answer": "lava is hot"}', True),
    ({"type": "json"}, '```json\n{"answer": "lava is hot"}\n```', True),
    ({"type": "json"}, 'Here it is: {"answer": "lava is hot"}', False),
    ({"type": "json"}, "{answer: lava is hot}", False),
    ({"type": "keyword", "word": "nature"}, "Lava shows the power of Nature itself.", True),
    ({"type": "keyword", "word": "nature"}, "Lava shows natural power in action.", False),
]


@pytest.mark.parametrize(("spec", "response", "met"), CASES)
def test_checker(spec, response, met):
    credit = ife.check(spec, response)
    assert (credit == 1.0) is met
    assert 0.0 <= credit <= 1.0


def test_every_type_has_a_positive_and_a_negative_case():
    types = {(s["type"], met) for s, _, met in CASES}
    assert types == {(t, m) for t in ife.PHRASINGS for m in (True, False)}


def test_soft_credit_grades_near_misses_above_far_misses():
    spec = {"type": "max_words", "n": 10}
    assert 1.0 > ife.check(spec, " ".join(["word"] * 12)) > ife.check(spec, " ".join(["word"] * 40))
    spec = {"type": "bullets", "n": 3}
    assert ife.check(spec, "* a b\n* c d") > ife.check(spec, "* a b c d")
    assert ife.check({"type": "lowercase"}, "Lava is hot today.") > ife.check({"type": "lowercase"}, "LAVA IS HOT.")


def test_too_short_answers_score_zero_even_when_vacuously_compliant():
    assert ife.check({"type": "lowercase"}, "ok.") == 0.0
    assert ife.check({"type": "no_commas"}, "") == 0.0
    assert ife.score("Describe snow. Avoid commas entirely.", "") == 0.0


def test_labelers_agree_and_use_the_documented_signatures():
    prompt = "Describe snow. Avoid commas entirely. Answer in fewer than 10 words."
    responses = ["Snow is frozen water falling softly.",                  # both met
                 "Snow is frozen water, falling softly.",                 # comma
                 "Snow is frozen water that falls softly from the grey winter sky, as you know."]  # both fail
    assert ife.compliance(prompt, responses) == [1.0, 0.5, 0.0]
    assert [ife.score(prompt, r) for r in responses] == [1.0, 0.5, 0.0]
    assert ife.score(prompt, responses) == [1.0, 0.5, 0.0]  # a list in, a list out: usable as a labeler
    soft = ife.rank(prompt, responses)
    assert soft[0] == 1.0 and soft[0] > soft[1] > soft[2] > 0.0
    assert ife.reward([prompt] * 3, responses) == soft
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        ife.reward([prompt, prompt], ["x"])


def test_prompt_without_a_known_constraint_is_a_clear_error():
    with pytest.raises(DataError, match="states no constraint"):
        ife.score("Tell me about snow.", "Snow is cold and white.")


def test_conflicting_types_are_never_combined():
    assert not ife.compatible("lowercase", "uppercase")
    assert not ife.compatible("json", "end_with")
    assert ife.compatible("json", "keyword")
    assert not ife.compatible("no_commas", "no_commas")


def test_repair_makes_any_demo_prompt_compliant():
    train, evaluation = build_prompts(seed=3, n_train=200, n_eval=40)
    answer = ("Well, Volcanoes are openings in the crust. Hot magma rises, and lava flows out! "
              "Ash clouds can travel far, and they affect the weather.")
    for row in train + evaluation:
        fixed = ife.repair(row["prompt"], answer)
        assert ife.score(row["prompt"], fixed) == 1.0, (row["prompt"], fixed)


def test_repair_of_json_keeps_valid_json_and_the_keyword():
    prompt = 'Describe snow. Respond only with a valid JSON object. Include the keyword "history" in your response.'
    fixed = ife.repair(prompt, "Snow is frozen water.")
    assert json.loads(fixed)["answer"].lower().startswith("history")
