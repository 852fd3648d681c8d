"""Labelling core: order parsing, candidates validation, and the locked append-only rankings store."""

from __future__ import annotations

import json
import multiprocessing
import threading

import pytest

from lora_rlhf.errors import DataError
from lora_rlhf.labeling import LabelSession, RankingStore, load_candidates, parse_order
from lora_rlhf.labeling.judgement import check_flags, dense_ranks


def write_candidates(path, n=3, k=4):
    rows = [{"id": f"p{i}", "prompt": f"prompt {i}", "responses": [f"r{i}.{j}" for j in range(k)],
             "meta": {"source": "test"}} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("text, ranks", [
    ("2 1 3=4", [2, 1, 3, 3]),     # 2 best, then 1, then 3 and 4 tied
    ("2>1>3=4", [2, 1, 3, 3]),
    ("2134", [2, 1, 3, 4]),        # K <= 9: one digit per response
    ("4=3 1 2", [2, 3, 1, 1]),     # a tie at the top; dense ranks
    (" 1, 2 , 3 ,4 ", [1, 2, 3, 4]),
])
def test_parse_order(text, ranks):
    assert parse_order(text, 4) == ranks


@pytest.mark.parametrize("text, match", [
    ("1 2 3", r"missing \[4\]"),
    ("1 1 2 3 4", r"repeated \[1\]"),
    ("1 2 3 5", r"no response \[5\]"),
    ("1=2=3=4", "all responses are tied"),
    ("= 1 2 3 4", "between two responses"),
    ("1 2 3 4=", "between two responses"),
    ("1 2 x 3 4", "cannot read the order"),
])
def test_parse_order_rejects(text, match):
    with pytest.raises(DataError, match=match):
        parse_order(text, 4)


def test_parse_order_many_responses_needs_separators():
    # K = 10: '10' is one response, not '1' then '0'.
    assert parse_order("10 1 2 3 4 5 6 7 8 9", 10) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 1]


def test_dense_ranks_and_flags():
    assert dense_ranks([1, 4, 4, 9], 4) == [1, 2, 2, 3]
    with pytest.raises(DataError, match="4 positive integers"):
        dense_ranks([1, 2, 3], 4)
    assert check_flags({"2": ["other", "harmful", "harmful"], "0": []}, 4) == {"2": ["harmful", "other"]}
    with pytest.raises(DataError, match="not valid"):
        check_flags({"1": ["rude"]}, 4)
    with pytest.raises(DataError, match="not a response index"):
        check_flags({"4": ["harmful"]}, 4)


@pytest.mark.parametrize("lines, match", [
    (['{"id": "a", "prompt": "p", "responses": ["x", "y"]}', '{"id": "b", "prompt": '], r"line 2: bad JSON"),
    (['{"id": "a", "responses": ["x", "y"]}'], r"line 1: has no 'prompt'"),
    (['{"id": "a", "prompt": "p"}'], r"line 1: has no 'responses'"),
    (['{"id": "a", "prompt": "p", "responses": ["only one"]}'], r"has 1 response\(s\); ranking needs at least 2"),
    (['{"id": "a", "prompt": "p", "responses": ["x", "y"]}', "", '{"id": "a", "prompt": "q", "responses": ["x", "y"]}'],
     r"line 3: duplicate id 'a' \(first on line 1\)"),
    (['{"prompt": "p", "responses": ["x", "y"]}'], r"needs an 'id'"),
    (['{"id": 1, "prompt": [{"role": "user"}], "responses": ["x", "y"]}'], r"'prompt' must be"),
    (["[1, 2]"], r"must be a JSON object"),
    ([""], "is empty"),
])
def test_load_candidates_rejects(tmp_path, lines, match):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match):
        load_candidates(path)


def test_load_candidates_reports_every_problem(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b", "prompt": "p", "responses": ["x"]}\n')
    with pytest.raises(DataError) as e:
        load_candidates(path)
    # line 1: no prompt + no responses (2), line 2: bad JSON (1), line 3: one response (1) -> 4, all at once.
    assert "4 problem(s)" in e.value.what
    assert all(f"line {n}" in e.value.what for n in (1, 2, 3))


def test_records_keep_candidate_keys_and_resume(tmp_path):
    cands, out = write_candidates(tmp_path / "c.jsonl"), tmp_path / "r.jsonl"
    session = LabelSession.open(cands, out)
    assert not out.exists()  # opening writes nothing
    assert session.submit("alice", "p0", ranks=[2, 1, 4, 4], flags={"1": ["harmful"]})
    assert session.submit("alice", "p1", skipped=True)
    (first, second) = read_lines(out)
    assert first["meta"] == {"source": "test"} and first["responses"] == ["r0.0", "r0.1", "r0.2", "r0.3"]
    assert first["ranks"] == [2, 1, 3, 3] and first["labeler"] == "alice" and first["flags"] == {"1": ["harmful"]}
    assert first["time"].endswith("Z") and "skipped" not in first
    assert second["skipped"] is True and "ranks" not in second

    # A new session (a restarted server) resumes: alice's next is p2; bob starts at p0.
    again = LabelSession.open(cands, out)
    assert again.next_item("alice")["item"]["id"] == "p2"
    assert again.next_item("alice")["progress"] == {"done": 2, "total": 3}
    assert again.next_item("bob")["item"]["id"] == "p0"
    assert not again.submit("alice", "p0", ranks=[1, 2, 3, 4])  # already judged: refused, nothing written
    assert len(read_lines(out)) == 2


def test_session_rejects_bad_submissions(tmp_path):
    session = LabelSession.open(write_candidates(tmp_path / "c.jsonl"), tmp_path / "r.jsonl")
    with pytest.raises(DataError, match="no prompt with id 'nope'"):
        session.submit("alice", "nope", ranks=[1, 2, 3, 4])
    with pytest.raises(DataError, match="labeler name"):
        session.submit("bad name!", "p0", ranks=[1, 2, 3, 4])
    with pytest.raises(DataError, match="all responses are tied"):
        session.submit("alice", "p0", ranks=[1, 1, 1, 1])
    assert not (tmp_path / "r.jsonl").exists()


def test_store_refuses_torn_or_corrupt_file(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"id": "p0", "labeler": "a"}\n{"id": "p1", "lab')
    with pytest.raises(DataError, match="incomplete line"):
        RankingStore(out)
    out.write_text('{"id": "p0", "labeler": "a"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        RankingStore(out)


def test_candidates_or_rankings_that_are_not_utf8_are_refused(tmp_path):
    """Reading with errors="replace" put U+FFFD into the rankings as if the labeler had seen it."""
    cands = tmp_path / "c.jsonl"
    cands.write_bytes(b'{"id": "p0", "prompt": "caf\xe9", "responses": ["x", "y"]}\n')
    with pytest.raises(DataError, match="c.jsonl' is not UTF-8 text: line 1"):
        load_candidates(cands)
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"id": "p0", "labeler": "a"}\n{"id": "p1", "labeler": "caf\xe9"}\n')
    with pytest.raises(DataError, match="line 2 is not UTF-8 text"):
        RankingStore(out)


def _label_everything(cands, out, labeler, n_threads_same_labeler=1):
    """One process: its own session (like one server), `n` threads labelling as `labeler` at the same time."""
    session = LabelSession.open(cands, out)

    def work():
        while (item := session.next_item(labeler)["item"]) is not None:
            session.submit(labeler, item["id"], ranks=[1, 2, 3, 4])

    threads = [threading.Thread(target=work) for _ in range(n_threads_same_labeler)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_labelers_lose_and_duplicate_nothing(tmp_path):
    n = 40
    cands, out = write_candidates(tmp_path / "c.jsonl", n=n), tmp_path / "r.jsonl"
    ctx = multiprocessing.get_context("fork")
    # Two processes x (alice | bob, plus 'sam' working in BOTH processes with 2 threads each on the same items).
    procs = [ctx.Process(target=_label_everything, args=(cands, out, name, threads))
             for name, threads in (("alice", 1), ("sam", 2), ("bob", 1), ("sam", 2))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    rows = read_lines(out)  # every line parses: no interleaved writes
    per = {name: sorted(int(r["id"][1:]) for r in rows if r["labeler"] == name) for name in ("alice", "bob", "sam")}
    # Each labeler judged each prompt exactly once, although sam's 4 workers raced for the same prompts.
    assert per == {name: list(range(n)) for name in per}
    assert len(rows) == 3 * n
