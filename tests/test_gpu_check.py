"""bench/gpu_check.sh's own logic, on the CPU: a stand-in `python` answers its GPU probe and plays each check."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == "-" ]]; then
    cat > /dev/null
    echo "$FAKE_GPUS | torch 2.13.0, CUDA 12.8: $FAKE_GPUS fake GPU(s)"
    exit 0
fi
echo "device=${LORA_RLHF_TEST_DEVICE:-none} $*" >> "$FAKE_CALLS"
case "$*" in
    *"$FAKE_FAIL"*) echo "Traceback: something broke"; echo "1 failed, 2 passed in 3.00s"; exit 1 ;;
esac
echo "2 passed in 1.00s"
"""


def gpu_check(tmp_path: Path, gpus: int, *checks: str, fail: str = "nothing fails") -> tuple[subprocess.CompletedProcess,
                                                                                            list[str]]:
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PYTHON": str(python), "FAKE_GPUS": str(gpus), "FAKE_FAIL": fail,
           "FAKE_CALLS": str(calls), "GPU_CHECK_OUT": str(tmp_path / "logs")}
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *checks], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    return run, calls.read_text().splitlines() if calls.exists() else []


def table(run: subprocess.CompletedProcess) -> dict[str, str]:
    rows = run.stdout.split("check       result seconds  note\n")[1].splitlines()
    return {row.split()[0]: row.split()[1] for row in rows if row and not row.startswith("gpu-check")}


def test_without_a_gpu_it_stops_at_once_and_says_why(tmp_path):
    run, calls = gpu_check(tmp_path, 0)
    assert run.returncode == 2 and calls == []
    assert "no NVIDIA GPU visible" in run.stderr


def test_one_gpu_runs_every_check_but_nccl_and_prints_one_table(tmp_path):
    run, calls = gpu_check(tmp_path, 1)
    assert run.returncode == 0, run.stdout + run.stderr
    assert table(run) == {"tests": "PASS", "ppo-memory": "PASS", "plan": "PASS", "pipeline": "PASS", "nccl": "SKIP"}
    assert "needs 2 GPUs, 1 visible" in run.stdout and "all checks passed" in run.stdout
    tests, memory, plan, pipeline = calls
    assert tests.startswith("device=cuda -m pytest") and "tests/test_gpu_paths.py" in tests
    assert memory.startswith("device=none bench/bench_ppo_memory.py --device cuda")
    assert plan.startswith("device=none bench/bench_plan.py --device cuda --strict")
    assert pipeline.startswith("device=cuda -m pytest") and "quick_variant" in pipeline


def test_a_failing_check_fails_the_whole_run_and_the_others_still_run(tmp_path):
    run, calls = gpu_check(tmp_path, 2, fail="bench_ppo_memory")
    assert run.returncode == 1
    assert table(run) == {"tests": "PASS", "ppo-memory": "FAIL", "plan": "PASS",
                          "pipeline": "PASS", "nccl": "PASS"}
    assert "| Traceback: something broke" in run.stdout  # the failed check's log tail
    assert len(calls) == 5 and "tests/test_distributed.py" in calls[-1] and calls[-1].startswith("device=cuda")
    assert (tmp_path / "logs" / "ppo-memory.log").read_text().startswith("Traceback")


@pytest.mark.parametrize("checks, expected", [(("plan",), {"plan": "PASS"}), (("bogus",), None)])
def test_checks_can_be_named(tmp_path, checks, expected):
    run, calls = gpu_check(tmp_path, 1, *checks)
    if expected is None:
        assert run.returncode == 2 and "unknown check 'bogus'" in run.stderr and calls == []
    else:
        assert run.returncode == 0 and table(run) == expected and len(calls) == 1
