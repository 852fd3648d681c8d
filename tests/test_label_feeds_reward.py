"""The rankings file the labelling tools write is read as is by `lora-rlhf reward` (its data loader)."""

from __future__ import annotations

import json

from lora_rlhf.labeling import LabelSession, parse_order
from lora_rlhf.recipe.config import DatasetConfig
from lora_rlhf.stages.reward import load_reward_data


def test_labelled_file_feeds_the_reward_loader(tmp_path):
    rows = [{"id": f"p{i}", "prompt": f"prompt {i}", "responses": [f"r{i}.{j}" for j in range(4)],
             "meta": {"k": i}} for i in range(3)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    session = LabelSession.open(tmp_path / "c.jsonl", tmp_path / "r.jsonl")
    session.submit("alice", "p0", ranks=parse_order("2 1 3=4", 4), flags={"3": ["harmful"]})
    session.submit("alice", "p1", skipped=True)
    session.submit("bob", "p2", ranks=parse_order("4 3 2 1", 4))

    comparisons, _ = load_reward_data(DatasetConfig(path=str(tmp_path / "r.jsonl")))
    # p0 '2 1 3=4': 6 pairs minus the tied (3, 4) = 5; p1 skipped: 0; p2 strict order of 4: 6  -> 11.
    assert len(comparisons) == 11
    p0 = {(c.chosen, c.rejected) for c in comparisons if c.prompt == "prompt 0"}
    assert p0 == {("r0.1", "r0.0"), ("r0.1", "r0.2"), ("r0.1", "r0.3"), ("r0.0", "r0.2"), ("r0.0", "r0.3")}
    assert ("r2.3", "r2.0") in {(c.chosen, c.rejected) for c in comparisons if c.prompt == "prompt 2"}
