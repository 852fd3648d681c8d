"""`lora-rlhf label` at the edge: bad input exits 2 with a clear message and writes nothing; serving prints the
URL, binds to 127.0.0.1 and stops cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_rlhf_cli.main import app

REPO = Path(__file__).resolve().parents[1]
GOOD = '{"id": "a", "prompt": "p", "responses": ["x", "y"]}'


def invoke(*args):
    return CliRunner().invoke(app, ["label", *map(str, args)])


@pytest.mark.parametrize("lines, message", [
    ([GOOD, '{"id": "b", "prompt": "p", "responses": ["x", "y"'], "line 2: bad JSON"),
    (['{"id": "a", "responses": ["x", "y"]}'], "line 1: has no 'prompt'"),
    (['{"id": "a", "prompt": "p", "responses": ["x"]}'], "ranking needs at least 2"),
    ([GOOD, GOOD], "line 2: duplicate id 'a' (first on line 1)"),
])
def test_malformed_candidates_exit_2_and_write_nothing(tmp_path, lines, message):
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    res = invoke(tmp_path / "c.jsonl", "--out", tmp_path / "r.jsonl", "--terminal", "--labeler", "x")
    assert res.exit_code == 2
    assert message in res.output and "fix:" in res.output
    assert not (tmp_path / "r.jsonl").exists()


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder the kernel refuses to create files in. chmod does not bind root, and sysfs refuses even root."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize("where, message", [
    ("missing/dir/r.jsonl", "folder '{tmp}/missing/dir' does not exist"),
    ("adir", "is a directory"),
    ("UNWRITABLE", "Permission denied"),
])
def test_unwritable_output_exits_2(tmp_path, where, message):
    (tmp_path / "c.jsonl").write_text(GOOD + "\n")
    (tmp_path / "adir").mkdir()
    out = _unwritable_folder(tmp_path) / "r.jsonl" if where == "UNWRITABLE" else tmp_path / where
    res = invoke(tmp_path / "c.jsonl", "--out", out)
    assert res.exit_code == 2, res.output
    assert message.format(tmp=tmp_path) in res.output and "fix:" in res.output
    assert not out.exists() or out.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "c.jsonl"] + (["locked"] if (
        tmp_path / "locked").exists() else [])  # no probe file left behind


def test_usage_errors(tmp_path):
    res = invoke()
    assert res.exit_code == 2 and "needs a candidates file and --out" in res.output
    (tmp_path / "c.jsonl").write_text(GOOD + "\n")
    res = invoke(tmp_path / "c.jsonl", "--out", tmp_path / "r.jsonl", "--port", 99999)  # was a traceback from bind
    assert res.exit_code == 2 and "--port" in res.output and "65535" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "r.jsonl").exists()
    (tmp_path / "cands").mkdir()
    res = invoke(tmp_path / "cands", "--out", tmp_path / "r.jsonl")
    assert res.exit_code == 2 and "candidates file" in res.output and "is a folder, not a file" in res.output
    res = invoke(tmp_path / "nope.jsonl", "--out", tmp_path / "r.jsonl")
    assert res.exit_code == 2 and "nope.jsonl' does not exist" in res.output
    (tmp_path / "c.jsonl").write_text(GOOD + "\n")
    res = invoke(tmp_path / "c.jsonl", "--out", tmp_path / "r.jsonl", "--labeler", "no spaces please")
    assert res.exit_code == 2 and "labeler name 'no spaces please' is not valid" in res.output


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig, background", [
    (signal.SIGINT, False),
    (signal.SIGINT, True),   # started from a background job: SIGINT arrives inherited as ignored
    (signal.SIGTERM, False),
    (signal.SIGTERM, True),
])
def test_serve_prints_url_binds_loopback_and_stops_on_ctrl_c(tmp_path, sig, background):
    (tmp_path / "c.jsonl").write_text(GOOD + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "lora_rlhf_cli.label", str(tmp_path / "c.jsonl"), "--out",
                             str(tmp_path / "r.jsonl"), "--labeler", "dana"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=_ignore_sigint if background else None)
    try:
        first = proc.stdout.readline()
        assert first.startswith("Labelling page: http://127.0.0.1:") and first.strip().endswith("/?labeler=dana")
        url = first.split(": ", 1)[1].strip()
        with urllib.request.urlopen(url.replace("/?labeler=dana", "/api/next?labeler=dana"), timeout=10) as r:
            assert json.loads(r.read())["item"]["id"] == "a"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Stopped; 0 judgement(s) written this run." in out
    assert not (tmp_path / "r.jsonl").exists()
