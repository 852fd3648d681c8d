"""`label --stats`: per-labeler counts and pairwise agreement, on a hand-made rankings file."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lora_rlhf.errors import DataError
from lora_rlhf.labeling.stats import compute_stats

R3 = ["a", "b", "c"]
R4 = ["a", "b", "c", "d"]
LINES = [
    {"id": "q1", "responses": R3, "ranks": [1, 2, 3], "labeler": "alice", "flags": {"2": ["harmful"]}},
    {"id": "q2", "responses": R4, "ranks": [1, 2, 3, 4], "labeler": "alice", "flags": {}},
    {"id": "q3", "responses": R3, "skipped": True, "labeler": "alice", "flags": {"0": ["other", "untruthful"]}},
    {"id": "q1", "responses": R3, "ranks": [1, 2, 3], "labeler": "bob", "flags": {}},  # replaced below
    {"id": "q2", "responses": R4, "ranks": [1, 2, 2, 3], "labeler": "bob", "flags": {}},
    {"id": "q3", "responses": R3, "ranks": [1, 2, 3], "labeler": "bob", "flags": {}},
    {"id": "q1", "responses": R3, "scores": [0.9, 0.5, 0.1], "labeler": "carol"},  # scores: higher is better
    {"id": "q1", "responses": R3, "ranks": [2, 1, 3], "labeler": "bob", "flags": {}},  # bob's last word on q1
]
# Pairs (i, j) per shared prompt; '+' = same preferred response, '-' = opposite, 't' = tied by either:
#   q1 alice [1,2,3] vs bob [2,1,3]:   (0,1) -  (0,2) +  (1,2) +            -> 2 of 3
#   q1 alice vs carol (scores = same order as alice):  + + +              -> 3 of 3
#   q1 bob vs carol: like alice vs bob                                    -> 2 of 3
#   q2 alice [1,2,3,4] vs bob [1,2,2,3]: (0,1)+ (0,2)+ (0,3)+ (1,2)t (1,3)+ (2,3)+ -> 5 of 5, 1 tied
#   q3: alice skipped it, so only bob ranked it: not shared.
# alice-bob 7/8 = 87.5%, alice-carol 3/3, bob-carol 2/3; overall (7+3+2)/(8+3+3) = 12/14 = 85.7%.


@pytest.fixture
def rankings(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", **x}) + "\n" for x in LINES))
    return path


def test_stats_arithmetic(rankings):
    s = compute_stats(rankings)
    assert s["lines"] == 8 and s["duplicates"] == 1  # bob's q1 twice; the last line counts
    assert {k: (v["labeled"], v["skipped"]) for k, v in s["labelers"].items()} == {
        "alice": (2, 1), "bob": (3, 0), "carol": (1, 0)}
    assert s["labelers"]["alice"]["flags"] == {"harmful": 1, "untruthful": 1, "fails_instruction": 0,
                                               "low_quality": 0, "other": 1}
    assert s["shared_items"] == 2  # q1 and q2
    assert {tuple(p["labelers"]): (p["items"], p["agreed"], p["compared"], p["tied"]) for p in s["pairs"]} == {
        ("alice", "bob"): (2, 7, 8, 1), ("alice", "carol"): (1, 3, 3, 0), ("bob", "carol"): (1, 2, 3, 0)}
    assert s["agreement"]["agreed"] == 12 and s["agreement"]["compared"] == 14
    assert s["agreement"]["rate"] == pytest.approx(12 / 14)


def test_stats_cli(rankings):
    from lora_rlhf_cli.main import app

    res = CliRunner().invoke(app, ["label", "--stats", str(rankings)])
    assert res.exit_code == 0, res.output
    assert "agreement: 85.7% of 14 response pairs on 2 prompts" in res.output
    assert "alice vs bob: 87.5% (7/8 pairs, 2 prompts, 1 pairs tied by either)" in res.output
    res = CliRunner().invoke(app, ["label", "--stats", str(rankings), "--json"])
    assert json.loads(res.output)["agreement"]["agreed"] == 12


def test_stats_bad_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q1", "responses": ["a", "b"], "ranks": [1, 2], "labeler": "x"}\n{oops\n')
    with pytest.raises(DataError, match="line 2: bad JSON"):
        compute_stats(bad)
    bad.write_text('{"id": "q1", "responses": ["a", "b"], "ranks": [1], "labeler": "x"}\n')
    with pytest.raises(DataError, match="line 1: needs 'ranks'"):
        compute_stats(bad)
    with pytest.raises(DataError, match="does not exist"):
        compute_stats(tmp_path / "missing.jsonl")
