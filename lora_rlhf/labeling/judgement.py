"""One labeler's judgement of one prompt: ranks, ties, flags -> a Rankings line (docs/FORMATS.md).

Ranks are stored dense (1, 2, 2, 3): 1 is best, equal ranks tie. Only the order matters downstream (every pair
with ranks[i] < ranks[j] becomes one comparison), so dense ranks lose nothing and read naturally.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from lora_rlhf.errors import DataError

# The paper's per-response metadata (InstructGPT, appendix B); kept for analysis, never changes the pairs.
FLAG_LABELS = ("harmful", "untruthful", "fails_instruction", "low_quality", "other")

_LABELER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_TOKEN = re.compile(r"\s*(\d+|=|>|,)\s*")


def check_labeler(name: Any) -> str:
    if not isinstance(name, str) or not _LABELER.fullmatch(name):  # `$` in match() would let "alice\n" through
        raise DataError(f"labeler name {name!r} is not valid",
                        fix="use 1-64 letters, digits, '_', '.', '@' or '-', starting with a letter or digit")
    return name


def dense_ranks(ranks: Any, k: int) -> list[int]:
    """Any positive integer ranks (lower = better) -> dense ranks 1..m; rejects wrong length and all-tied."""
    if not isinstance(ranks, list) or len(ranks) != k or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise DataError(f"ranks must be {k} positive integers (one per response, 1 = best), got {ranks!r}",
                        fix="rank every response")
    levels = sorted(set(ranks))
    if len(levels) < 2:
        raise DataError("all responses are tied, which gives no comparison at all",
                        fix="order at least two responses, or skip the prompt")
    return [levels.index(r) + 1 for r in ranks]


def parse_order(text: str, k: int) -> list[int]:
    """'2 1 3=4' (best first, '=' ties) -> ranks per response, here [2, 1, 3, 3].

    Separators are spaces, ',' or '>'. With K <= 9 each digit is one response, so '2134' and '21 3=4' work too.
    """
    pos, tokens = 0, []
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise DataError(f"cannot read the order {text!r} at {text[pos:]!r}",
                            fix=f"type response numbers best first, e.g. '2 1 3=4' ('=' ties), using 1..{k}")
        tok = m.group(1)
        tokens += list(tok) if tok.isdigit() and k <= 9 else [tok]
        pos = m.end()
    groups: list[list[int]] = []
    tie_next = False
    for tok in tokens:
        if tok == "=":
            if not groups or tie_next:
                raise DataError(f"'=' in {text!r} must stand between two responses", fix="e.g. '2 1 3=4'")
            tie_next = True
        elif tok.isdigit():
            if tie_next:
                groups[-1].append(int(tok))
            else:
                groups.append([int(tok)])
            tie_next = False
        elif tie_next:
            raise DataError(f"'=' in {text!r} must stand between two responses", fix="e.g. '2 1 3=4'")
    if tie_next:
        raise DataError(f"'=' in {text!r} must stand between two responses", fix="e.g. '2 1 3=4'")
    seen = [n for g in groups for n in g]
    bad = sorted({n for n in seen if not 1 <= n <= k})
    dup = sorted({n for n in seen if seen.count(n) > 1})
    missing = sorted(set(range(1, k + 1)) - set(seen))
    if bad or dup or missing:
        parts = ([f"no response {bad}" if len(bad) == 1 else f"no responses {bad}"] if bad else []) + (
            [f"repeated {dup}"] if dup else []) + ([f"missing {missing}"] if missing else [])
        raise DataError(f"the order {text!r} is incomplete: {', '.join(parts)}",
                        fix=f"name each of the responses 1..{k} exactly once, best first, e.g. '2 1 3=4'")
    ranks = [0] * k
    for place, group in enumerate(groups, start=1):
        for n in group:
            ranks[n - 1] = place
    return dense_ranks(ranks, k)


def check_flags(flags: Any, k: int) -> dict[str, list[str]]:
    """{"2": ["harmful"]} with 0-based response indices as strings; empty lists dropped, labels de-duplicated."""
    if flags is None:
        return {}
    if not isinstance(flags, dict):
        raise DataError(f"flags must map a response index to labels, got {flags!r}", fix='e.g. {"1": ["harmful"]}')
    out: dict[str, list[str]] = {}
    for key, labels in flags.items():
        if not str(key).isdigit() or not 0 <= int(key) < k:
            raise DataError(f"flag key {key!r} is not a response index 0..{k - 1}", fix="flag an existing response")
        if isinstance(labels, str):
            labels = [labels]
        if not isinstance(labels, list) or any(lab not in FLAG_LABELS for lab in labels):
            raise DataError(f"flag labels {labels!r} for response {key} are not valid",
                            fix=f"use any of: {', '.join(FLAG_LABELS)}")
        kept = [lab for lab in FLAG_LABELS if lab in labels]  # canonical order, no repeats
        if kept:
            out[str(int(key))] = kept
    return out


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_record(candidate: dict[str, Any], labeler: str, ranks: list[int] | None,
                flags: dict[str, list[str]], skipped: bool = False) -> dict[str, Any]:
    """The candidates line, untouched, plus the judgement keys."""
    record = {k: v for k, v in candidate.items() if k not in ("ranks", "scores", "skipped")}
    if skipped:
        record["skipped"] = True
    else:
        record["ranks"] = ranks
    record.update(labeler=labeler, flags=flags, time=utc_now())
    return record
