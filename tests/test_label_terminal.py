"""`lora-rlhf label --terminal` driven through a real pseudo-terminal (pexpect), as over SSH."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parents[1]


def test_terminal_ranks_flags_skips_and_resumes(tmp_path):
    rows = [{"id": f"p{i}", "prompt": f"Question {i}?", "responses": [f"reply {i}.{j}" for j in range(4)]}
            for i in range(3)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.jsonl"
    env = {**os.environ, "NO_COLOR": "1", "TERM": "xterm", "PYTHONPATH": str(REPO)}
    # lora_rlhf_cli.label directly: the same command, without importing every other command (torch) at start-up.
    cmd = [sys.executable, "-m", "lora_rlhf_cli.label", str(tmp_path / "c.jsonl"), "--out", str(out),
           "--terminal", "--labeler", "tess"]

    child = pexpect.spawn(cmd[0], cmd[1:], env=env, cwd=str(REPO), encoding="utf-8", timeout=30,
                          dimensions=(50, 120))
    child.expect("prompt p0")
    child.expect("reply 0.3")
    child.expect_exact("? help > ")
    child.sendline("1 1 2")                       # invalid: the error is shown and the item stays
    child.expect("incomplete")
    child.sendline("f3 harm")                     # abbreviated flag on response 3
    child.expect("response 3 flags: harmful")
    child.sendline("2 1 3=4")
    child.expect(r"saved p0: 2 > 1 > 3 = 4")
    child.expect("prompt p1")
    child.sendline("s")
    child.expect("skipped p1")
    child.expect("prompt p2")
    child.sendline("q")
    child.expect(r"1 ranked, 1 skipped now; 2 of 3 done for tess")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    first, second = [json.loads(x) for x in out.read_text().splitlines()]
    assert (first["id"], first["ranks"], first["flags"], first["labeler"]) == ("p0", [2, 1, 3, 3], {"2": ["harmful"]},
                                                                               "tess")
    assert (second["id"], second["skipped"], "ranks" in second) == ("p1", True, False)

    # Restarting resumes at p2; Ctrl-D quits cleanly too.
    child = pexpect.spawn(cmd[0], cmd[1:], env=env, cwd=str(REPO), encoding="utf-8", timeout=30)
    child.expect("prompt p2")
    child.expect_exact("? help > ")
    child.sendeof()
    child.expect("2 of 3 done for tess")
    child.expect(pexpect.EOF)
    child.close()
    assert len(out.read_text().splitlines()) == 2
