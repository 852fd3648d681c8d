"""Per-labeler counts and inter-labeler agreement of a Rankings file.

Agreement follows the paper's measure (InstructGPT reports ~73% between training labelers): for every prompt
two labelers both ranked, and every pair of its responses that BOTH ranked strictly (no tie), did they prefer
the same one? Pairs either labeler tied are not compared (they give no comparison to the reward model either)
and are counted separately. When a labeler judged a prompt twice (concatenated files), the last line counts.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

from lora_rlhf.core.io import read_jsonl
from lora_rlhf.errors import DataError
from lora_rlhf.labeling.judgement import FLAG_LABELS


def _ranks_of(row: dict[str, Any], lineno: int, path: Path) -> list[float] | None:
    """Lower is better; None for a skipped line."""
    if row.get("skipped") is True:
        return None
    k = len(row.get("responses") or [])
    if isinstance(row.get("ranks"), list):
        values = row["ranks"]
    elif isinstance(row.get("scores"), list):
        values = [-s for s in row["scores"]] if all(isinstance(s, (int, float)) for s in row["scores"]) else None
    else:
        values = None
    if values is None or len(values) != k or not all(isinstance(v, (int, float)) for v in values):
        raise DataError(f"rankings file '{path}' line {lineno}: needs 'ranks' (or 'scores'), one number per "
                        "response, or \"skipped\": true", fix="see docs/FORMATS.md, Rankings")
    return [float(v) for v in values]


def _sign(a: float, b: float) -> int:
    return (a < b) - (a > b)  # +1: first preferred (lower rank), -1: second, 0: tie


def compute_stats(path: str | Path, missing_ok: bool = False) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return compute_stats_from_rows([], path)
        raise DataError(f"rankings file '{path}' does not exist", fix="label something first: lora-rlhf label ...")
    rows = read_jsonl(path, "rankings file")
    for lineno, row in rows:
        if not isinstance(row, dict) or "id" not in row:
            raise DataError(f"rankings file '{path}' line {lineno}: needs an object with an 'id'",
                            fix="see docs/FORMATS.md, Rankings")
    return compute_stats_from_rows(rows, path)


def compute_stats_from_rows(rows: list[tuple[int, dict[str, Any]]], path: Path) -> dict[str, Any]:
    latest: dict[tuple[str, str], tuple[list[float] | None, dict[str, Any]]] = {}
    duplicates = 0
    for lineno, row in rows:
        labeler = str(row.get("labeler") or "(unnamed)")
        key = (labeler, str(row["id"]))
        duplicates += key in latest
        latest[key] = (_ranks_of(row, lineno, path), row)

    labelers: dict[str, dict[str, Any]] = {}
    by_item: dict[str, dict[str, list[float]]] = {}
    for (labeler, item_id), (ranks, row) in latest.items():
        entry = labelers.setdefault(labeler, {"labeled": 0, "skipped": 0, "flags": dict.fromkeys(FLAG_LABELS, 0)})
        entry["labeled" if ranks is not None else "skipped"] += 1
        for labels in (row.get("flags") or {}).values():
            for label in labels if isinstance(labels, list) else [labels]:
                entry["flags"][label] = entry["flags"].get(label, 0) + 1
        if ranks is not None:
            by_item.setdefault(item_id, {})[labeler] = ranks

    pair_stats: dict[tuple[str, str], dict[str, int]] = {}
    mismatched = 0
    shared = 0
    for judgements in by_item.values():
        if len(judgements) < 2:
            continue
        shared += 1
        for a, b in combinations(sorted(judgements), 2):
            ra, rb = judgements[a], judgements[b]
            if len(ra) != len(rb):  # same id, different candidates: nothing comparable
                mismatched += 1
                continue
            s = pair_stats.setdefault((a, b), {"items": 0, "agreed": 0, "compared": 0, "tied": 0})
            s["items"] += 1
            for i, j in combinations(range(len(ra)), 2):
                sa, sb = _sign(ra[i], ra[j]), _sign(rb[i], rb[j])
                if sa == 0 or sb == 0:
                    s["tied"] += 1
                else:
                    s["compared"] += 1
                    s["agreed"] += sa == sb

    agreed = sum(s["agreed"] for s in pair_stats.values())
    compared = sum(s["compared"] for s in pair_stats.values())
    return {
        "file": str(path),
        "lines": len(rows),
        "duplicates": duplicates,
        "labelers": dict(sorted(labelers.items())),
        "shared_items": shared,
        "mismatched_items": mismatched,
        "agreement": {"agreed": agreed, "compared": compared, "rate": agreed / compared if compared else None},
        "pairs": [{"labelers": [a, b], **s, "rate": s["agreed"] / s["compared"] if s["compared"] else None}
                  for (a, b), s in sorted(pair_stats.items())],
    }


def format_stats(stats: dict[str, Any]) -> str:
    """Plain-text report for the terminal."""
    out = [f"{stats['file']}: {stats['lines']} lines"
           + (f" ({stats['duplicates']} repeated judgements; last one kept)" if stats["duplicates"] else "")]
    out.append(f"{'labeler':<20} {'labeled':>8} {'skipped':>8}  flags")
    for name, s in stats["labelers"].items():
        flags = ", ".join(f"{k}={v}" for k, v in s["flags"].items() if v) or "-"
        out.append(f"{name:<20} {s['labeled']:>8} {s['skipped']:>8}  {flags}")
    a = stats["agreement"]
    if a["compared"]:
        out.append(f"agreement: {a['rate']:.1%} of {a['compared']} response pairs on {stats['shared_items']} "
                   "prompts ranked by 2+ labelers (the paper: ~73%)")
        for p in stats["pairs"]:
            rate = f"{p['rate']:.1%}" if p["rate"] is not None else "n/a"
            out.append(f"  {p['labelers'][0]} vs {p['labelers'][1]}: {rate} ({p['agreed']}/{p['compared']} pairs, "
                       f"{p['items']} prompts, {p['tied']} pairs tied by either)")
    else:
        out.append("agreement: no prompt ranked by two labelers yet (give several labelers the same candidates)")
    if stats["mismatched_items"]:
        out.append(f"warning: {stats['mismatched_items']} shared ids have different numbers of responses; ignored")
    return "\n".join(out)
