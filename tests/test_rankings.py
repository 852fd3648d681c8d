"""Rankings -> comparisons (K(K-1)/2 pairs, ties, bad lines), TRL preference formats, and per-prompt batching."""

from __future__ import annotations

import itertools

import pytest

from lora_rlhf.errors import DataError
from lora_rlhf.stages.rankings import (
    pairs_from_ranks,
    pairs_from_scores,
    preferences_to_comparisons,
    rankings_to_comparisons,
    to_comparisons,
)
from lora_rlhf.stages.reward import PromptGroupBatchSampler


def ranking(k: int, **extra) -> dict:
    return {"prompt": "p", "responses": [f"r{i}" for i in range(k)], **extra}


@pytest.mark.parametrize("k", range(2, 10))
def test_strict_ranking_gives_every_pair_once(k):
    # ranks 1..K: response i beats every j > i, so the pairs are all i < j: K(K-1)/2 of them.
    comparisons = rankings_to_comparisons([ranking(k, ranks=list(range(1, k + 1)))], "x")
    assert len(comparisons) == k * (k - 1) // 2
    assert {(c.chosen, c.rejected) for c in comparisons} == {(f"r{i}", f"r{j}")
                                                             for i, j in itertools.combinations(range(k), 2)}


def test_ties_give_no_pair_and_scores_mean_higher_is_better():
    # FORMATS.md example: ranks [1, 3, 2, 2] -> 6 pairs minus the tie between responses 2 and 3 = 5.
    assert sorted(pairs_from_ranks([1, 3, 2, 2])) == [(0, 1), (0, 2), (0, 3), (2, 1), (3, 1)]
    # The same judgement as scores (higher is better) gives the same pairs.
    assert sorted(pairs_from_scores([0.9, 0.1, 0.5, 0.5])) == [(0, 1), (0, 2), (0, 3), (2, 1), (3, 1)]


def test_skipped_lines_give_no_pairs_and_groups_follow_lines():
    rows = [ranking(3, ranks=[1, 2, 3]), {"prompt": "q", "skipped": True}, ranking(2, scores=[0.0, 1.0])]
    comparisons = rankings_to_comparisons(rows, "x")
    assert [c.group for c in comparisons] == [0, 0, 0, 2]
    assert (comparisons[-1].chosen, comparisons[-1].rejected) == ("r1", "r0")


@pytest.mark.parametrize("row, message", [
    (ranking(1, ranks=[1]), "1 response.*at least two"),
    (ranking(4, ranks=[2, 2, 2, 2]), "all 4 responses are tied"),
    (ranking(3, scores=[0.5, 0.5, 0.5]), "all 3 responses are tied"),
    (ranking(3), "exactly one of 'ranks'"),
    (ranking(3, ranks=[1, 2]), "'ranks' must be a list of 3 numbers"),
    (ranking(3, ranks=[1, 2, "x"]), "'ranks' must be a list of 3 numbers"),
    ({"responses": ["a", "b"], "ranks": [1, 2]}, "missing 'prompt'"),
    ({"prompt": "", "responses": ["a", "b"], "ranks": [1, 2]}, "'prompt' must be a non-empty string"),
])
def test_bad_ranking_lines_are_refused_with_the_line_number(row, message):
    with pytest.raises(DataError, match=message) as info:
        rankings_to_comparisons([ranking(2, ranks=[1, 2]), row], "r.jsonl")
    assert "line 2" in str(info.value)


def test_preference_formats_all_become_prompt_plus_response():
    msgs = [{"role": "user", "content": "Hi?"}]
    rows = [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},  # standard, explicit
        {"chosen": "Q: Hi? A: Hello!", "rejected": "Q: Hi? A: Go away."},  # standard, implicit
        {"prompt": msgs, "chosen": [{"role": "assistant", "content": "Hello!"}],  # conversational, explicit
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"chosen": msgs + [{"role": "assistant", "content": "Hello!"}],  # conversational, implicit
         "rejected": msgs + [{"role": "assistant", "content": "Go away."}]},
    ]
    got = [(c.prompt, c.chosen, c.rejected) for c in preferences_to_comparisons(rows, "x")]
    assert got == [("Hi?", "Hello!", "Go away."), ("Q: Hi? A: ", "Hello!", "Go away."),
                   (msgs, "Hello!", "Go away."), (msgs, "Hello!", "Go away.")]


def test_format_detection_and_empty_results():
    with pytest.raises(DataError, match="needs rankings .* or preferences"):
        to_comparisons([{"text": "x"}], ["text"], "x")
    with pytest.raises(DataError, match="neither 'ranks' nor 'scores'"):
        to_comparisons([ranking(2)], ["prompt", "responses"], "x")
    with pytest.raises(DataError, match="every line is skipped"):
        to_comparisons([{"prompt": "p", "responses": ["a", "b"], "ranks": None, "skipped": True}],
                       ["prompt", "responses", "ranks", "skipped"], "x")
    with pytest.raises(DataError, match="share no prompt prefix"):
        preferences_to_comparisons([{"chosen": "abc", "rejected": "xyz"}], "x")


def test_group_batches_keep_every_prompt_whole():
    # 10 prompts with 1..6 pairs each (K = 2..4), batches of about 8 pairs.
    sizes = [1, 3, 6, 3, 1, 6, 3, 3, 6, 1]
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    sampler = PromptGroupBatchSampler(groups, batch_size=8, seed=0)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == -(-len(groups) // 8)  # fixed: the Trainer counts steps up front
        assert sorted(i for b in batches for i in b) == list(range(len(groups)))  # every pair exactly once
        for b in batches:  # a prompt's pairs are never split across batches
            for g in {groups[i] for i in b}:
                assert sum(groups[i] == g for i in b) == sizes[g]
        orders.append(batches)
    assert orders[0] != orders[1]  # reshuffled each epoch
    sampler.set_epoch(1)
    assert list(sampler) == orders[1]  # deterministic per epoch, so --resume skips the same batches


def test_a_prompt_larger_than_the_batch_gets_a_batch_of_its_own():
    groups = [0] * 36 + [1] * 36  # K = 9 twice: 36 pairs each, batch size 8
    batches = list(PromptGroupBatchSampler(groups, batch_size=8))
    assert sorted(len(b) for b in batches) == [36, 36]


def test_pairs_whose_chosen_equals_rejected_are_dropped_with_their_lines(caplog):
    """A pair with the same text on both sides gives the reward model nothing (loss ln 2, zero gradient): the
    demo of issue 28 trained on such data to chance and was marked complete."""
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "q", "chosen": "good", "rejected": "bad"},
            ranking(3, ranks=[1, 2, 3]) | {"responses": ["a", "a", "b"]}]  # two samples with one text
    comparisons = to_comparisons(rows[:2], ["prompt", "chosen", "rejected"], "prefs.jsonl")
    assert [(c.chosen, c.rejected) for c in comparisons] == [("good", "bad")]
    assert "1 pair(s) whose chosen and rejected texts are identical (line 1) are dropped" in caplog.text
    ranked = to_comparisons(rows[2:], ["prompt", "responses", "ranks"], "r.jsonl")
    assert sorted((c.chosen, c.rejected) for c in ranked) == [("a", "b"), ("a", "b")]


def test_data_where_every_pair_is_identical_is_refused():
    rows = [{"prompt": f"p{i}", "chosen": "same answer", "rejected": "same answer"} for i in range(4)]
    with pytest.raises(DataError, match="in every one of its 4 pairs the chosen response is the same text"):
        to_comparisons(rows, ["prompt", "chosen", "rejected"], "prefs.jsonl")


def test_pairs_ranked_both_ways_are_counted_with_examples(caplog):
    rows = [{"id": "p1", "prompt": "p", "responses": ["x", "y", "z"], "ranks": [1, 2, 3], "labeler": "alice"},
            {"id": "p1", "prompt": "p", "responses": ["y", "x", "z"], "ranks": [1, 2, 3], "labeler": "alice"},
            {"id": "p2", "prompt": "other", "responses": ["x", "y"], "ranks": [2, 1]}]  # another prompt: no conflict
    comparisons = to_comparisons(rows, ["id", "prompt", "responses", "ranks", "labeler"], "r.jsonl")
    assert len(comparisons) == 7  # nothing dropped: they are real judgements, reported
    assert "1 response pair(s) are ranked both ways" in caplog.text
    assert "line 1 (alice) prefer 'x' to 'y', line 2 (alice) the reverse" in caplog.text


def test_best_vs_rest_keeps_the_pairs_won_by_a_best_response():
    # ranks [1, 3, 2, 2]: all pairs (0,1) (0,2) (0,3) (2,1) (3,1); best vs rest keeps response 0's three.
    line = {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranks": [1, 3, 2, 2]}
    best = rankings_to_comparisons([line], "x", pairs="best_vs_rest")
    assert [(c.chosen, c.rejected) for c in best] == [("a", "b"), ("a", "c"), ("a", "d")]
    assert len(rankings_to_comparisons([line], "x")) == 5  # the reward model's rule is unchanged
    # A tie for best: each best response against every worse one. Scores are ranks with the sign flipped.
    tied = {"prompt": "p", "responses": ["a", "b", "c"], "scores": [0.9, 0.9, 0.1]}
    assert [(c.chosen, c.rejected) for c in to_comparisons([tied], list(tied), "x", pairs="best_vs_rest")] == [
        ("a", "c"), ("b", "c")]
    # K = 6 without ties: K - 1 = 5 pairs instead of 15.
    six = ranking(6, ranks=[4, 1, 6, 2, 5, 3])
    pairs = rankings_to_comparisons([six], "x", pairs="best_vs_rest")
    assert len(pairs) == 5 and {c.chosen for c in pairs} == {"r1"}
    # Preference rows are one pair each, whatever the rule.
    row = {"prompt": "p", "chosen": "good", "rejected": "bad"}
    assert len(to_comparisons([row], list(row), "x", pairs="best_vs_rest")) == 1


def test_held_out_comparisons_are_whole_prompts(tmp_path):
    from helpers import write_jsonl

    from lora_rlhf.recipe.config import DatasetConfig
    from lora_rlhf.stages.rankings import load_comparisons

    rows = [ranking(3, ranks=[1, 2, 3], id=i) | {"prompt": f"p{i}"} for i in range(10)]
    cfg = DatasetConfig(path=str(write_jsonl(tmp_path / "r.jsonl", rows)), eval_fraction=0.2)
    train, held = load_comparisons(cfg, seed=0, pairs="best_vs_rest")
    assert len(held) == 2 * 2 and len(train) == 8 * 2  # 2 of 10 prompts, 2 pairs each under best-vs-rest
    assert not {c.prompt for c in train} & {c.prompt for c in held}
    # the same prompts are held out whatever the pair rule (the reward model and DPO share the split)
    assert {c.prompt for c in load_comparisons(cfg, seed=0)[1]} == {c.prompt for c in held}
    with pytest.raises(DataError, match="set data.dpo.eval_fraction: 0"):
        load_comparisons(DatasetConfig(path=str(write_jsonl(tmp_path / "one.jsonl", rows[:1])), eval_fraction=0.2),
                         key="data.dpo")
