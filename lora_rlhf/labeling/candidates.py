"""Read and validate a Candidates JSONL file (docs/FORMATS.md) before anything is shown or written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_rlhf.core.io import read_jsonl
from lora_rlhf.errors import DataError

MAX_PROBLEMS = 10  # enough to fix a file in one pass without flooding the terminal


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _line_problems(row: Any) -> list[str]:
    if not isinstance(row, dict):
        return [f"must be a JSON object, got {type(row).__name__}"]
    problems = []
    item_id = row.get("id")
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id).strip() == "":
        problems.append("needs an 'id' (a non-empty string or integer): resuming and agreement use it")
    prompt = row.get("prompt")
    if "prompt" not in row:
        problems.append("has no 'prompt'")
    elif not ((isinstance(prompt, str) and prompt.strip()) or _is_messages(prompt)):
        problems.append("'prompt' must be a non-empty string or a list of {role, content} messages")
    responses = row.get("responses")
    if "responses" not in row:
        problems.append("has no 'responses'")
    elif not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        problems.append("'responses' must be a list of strings")
    elif len(responses) < 2:
        problems.append(f"has {len(responses)} response(s); ranking needs at least 2")
    return problems


def load_candidates(path: str | Path) -> list[dict[str, Any]]:
    """Every line of a Candidates JSONL, validated; raises DataError listing (up to 10) problems by line number."""
    path = Path(path)
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    first_line_of: dict[str, int] = {}
    # Invalid UTF-8 is refused (read_jsonl names the line): replaced bytes would reach the rankings as if the
    # labeler had seen them.
    parsed = read_jsonl(path, "candidates file", problems,
                        fix="pass the JSONL written by `lora-rlhf compare` (one {id, prompt, responses} per line)")
    for lineno, row in parsed:
        line_problems = _line_problems(row)
        problems += [f"line {lineno}: {p}" for p in line_problems]
        if line_problems:
            continue
        key = str(row["id"])
        if key in first_line_of:
            problems.append(f"line {lineno}: duplicate id {row['id']!r} (first on line {first_line_of[key]})")
            continue
        first_line_of[key] = lineno
        rows.append(row)
    if problems:
        problems.sort(key=lambda p: int(p.split(":", 1)[0].removeprefix("line ")))  # in file order
        shown = problems[:MAX_PROBLEMS]
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
        listing = "\n".join(f"  - {p}" for p in shown)
        raise DataError(f"candidates file '{path}' has {len(problems)} problem(s):\n{listing}{more}",
                        fix='each line must be {"id": "p1", "prompt": "...", "responses": ["...", "..."]} with a '
                            "unique id and at least 2 responses (docs/FORMATS.md, Candidates)")
    if not rows:
        raise DataError(f"candidates file '{path}' is empty", fix="generate candidates with `lora-rlhf compare` first")
    return rows
