"""Comparisons for the reward model and DPO: K-wise rankings and TRL preference rows -> (prompt, chosen, rejected).

The paper's labelers rank K = 4..9 responses per prompt and every one of the K(K-1)/2 ordered pairs becomes a
comparison (`pairs="all"`, the reward model's rule); `pairs="best_vs_rest"` keeps only the pairs whose chosen
response is a best-ranked one (K-1 pairs without ties; a DPO choice). A ranking line (docs/FORMATS.md) carries
`ranks` (1 = best) or `scores` (higher = better); equal values are ties and give no pair; a line whose responses
are all tied, or that has fewer than two responses, is an error; `"skipped": true` lines give no pairs.

Every comparison keeps the index of the line it came from (`group`), so that training can put all pairs of
one prompt in the same batch (the paper's fix for reward-model overfitting) and held-out evaluation can split
by prompt rather than by pair.

TRL's preference format is read too: `chosen` / `rejected` with an explicit `prompt` or an implicit one (the
shared prefix), as strings (standard) or message lists (conversational). Whatever the input, a comparison is
stored as (prompt, response text), so the reward model always sees prompt + response through the chat template,
exactly as PPO will show it a rollout.

Degenerate data is caught here, the one place comparisons are made: a pair whose chosen text equals its rejected
one carries no signal (its loss is ln 2 whatever the model, its gradient zero) and is refused - dropped with a
warning, or a DataError when nothing else is left - and pairs ranked both ways (the same prompt and responses in
opposite order) are counted and shown.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lora_rlhf.core.data import load_table
from lora_rlhf.core.text import Prompt
from lora_rlhf.errors import DataError
from lora_rlhf.recipe.config import DatasetConfig, PairRule

log = logging.getLogger(__name__)
FLAG_LABELS = ("harmful", "untruthful", "fails_instruction", "low_quality", "other")
EXAMPLES = 3  # lines quoted in a warning about degenerate pairs
RANKING_COLUMNS = ("prompt", "responses")
PREFERENCE_COLUMNS = ("chosen", "rejected")


@dataclass(frozen=True)
class Comparison:
    prompt: Prompt
    chosen: str
    rejected: str
    group: int
    """Index of the source line: all pairs of one ranked prompt share it."""


def pairs_from_ranks(ranks: Sequence[float]) -> list[tuple[int, int]]:
    """ranks (1 = best; ties equal) -> (winner, loser) index pairs, K(K-1)/2 without ties.

    [1, 3, 2, 2] -> [(0, 1), (0, 2), (0, 3), (2, 1), (3, 1)]: the tied pair (2, 3) gives nothing.
    """
    k = len(ranks)
    pairs = []
    for i in range(k):
        for j in range(k):
            if ranks[i] < ranks[j]:
                pairs.append((i, j))
    return pairs


def pairs_from_scores(scores: Sequence[float]) -> list[tuple[int, int]]:
    """scores (higher = better) -> (winner, loser) pairs: a score is a rank with the sign flipped."""
    return pairs_from_ranks([-s for s in scores])


def best_vs_rest(ranks: Sequence[float]) -> list[tuple[int, int]]:
    """ranks (1 = best) -> the pairs of `pairs_from_ranks` whose winner holds the best rank: each best response
    against every worse one. [1, 3, 2, 2] -> [(0, 1), (0, 2), (0, 3)]; [1, 1, 2] -> [(0, 2), (1, 2)]."""
    best = min(ranks)
    return [(w, lo) for w, lo in pairs_from_ranks(ranks) if ranks[w] == best]


def ranking_pairs(row: dict[str, Any], where: str, pairs: PairRule = "all") -> list[tuple[int, int]]:
    """Validate one ranking line and return its (winner, loser) pairs under the rule `pairs`; [] for a skipped
    line."""
    if row.get("skipped"):
        return []
    responses = row.get("responses")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise DataError(f"{where}: 'responses' must be a list of strings, got {str(responses)[:80]!r}",
                        fix="give the K sampled responses as a JSON list of strings")
    if len(responses) < 2:
        raise DataError(f"{where}: {len(responses)} response(s); a ranking needs at least two to compare",
                        fix="drop the line, mark it \"skipped\": true, or add responses")
    ranks, scores = row.get("ranks"), row.get("scores")
    if (ranks is None) == (scores is None):
        raise DataError(f"{where}: needs exactly one of 'ranks' (1 = best) or 'scores' (higher = better)",
                        fix="add the labeler's judgement, or mark the line \"skipped\": true")
    key, values = ("ranks", ranks) if ranks is not None else ("scores", scores)
    if (not isinstance(values, list) or len(values) != len(responses)
            or not all(_is_number(v) for v in values)):
        raise DataError(f"{where}: '{key}' must be a list of {len(responses)} numbers (one per response), "
                        f"got {str(values)[:80]!r}", fix=f"give one {key[:-1]} per response, in response order")
    ranks_ = list(values) if key == "ranks" else [-v for v in values]  # scores are ranks with the sign flipped
    found = pairs_from_ranks(ranks_) if pairs == "all" else best_vs_rest(ranks_)
    if not found:
        raise DataError(f"{where}: all {len(responses)} responses are tied, so the line gives no comparison",
                        fix="rank at least two responses differently, or mark the line \"skipped\": true")
    return found


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_prompt(prompt: Any, where: str) -> None:
    ok = (isinstance(prompt, str) and prompt.strip() != "") or (
        isinstance(prompt, list) and len(prompt) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt))
    if not ok:
        raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of {{role, content}} messages, "
                        f"got {str(prompt)[:80]!r}", fix="fix or drop that line")


def rankings_to_comparisons(rows: Iterable[dict[str, Any]], source: str, pairs: PairRule = "all") -> list[Comparison]:
    """Ranking lines -> comparisons (every non-tied pair, or best vs rest). Raises DataError naming the first bad
    line."""
    out: list[Comparison] = []
    for i, row in enumerate(rows):
        where = f"'{source}' line {i + 1}"
        if row.get("skipped"):
            continue
        for column in RANKING_COLUMNS:
            if row.get(column) is None:
                raise DataError(f"{where}: missing '{column}'",
                                fix="each ranking line needs prompt, responses and ranks or scores "
                                    "(docs/FORMATS.md)")
        _check_prompt(row["prompt"], where)
        responses = row["responses"]
        for winner, loser in ranking_pairs(row, where, pairs):
            out.append(Comparison(row["prompt"], responses[winner], responses[loser], group=i))
    return out


def preferences_to_comparisons(rows: Iterable[dict[str, Any]], source: str) -> list[Comparison]:
    """TRL preference rows (explicit or implicit prompt; standard or conversational) -> comparisons."""
    out: list[Comparison] = []
    for i, row in enumerate(rows):
        where = f"'{source}' line {i + 1}"
        chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
        for column, value in (("chosen", chosen), ("rejected", rejected)):
            if value is None:
                raise DataError(f"{where}: missing '{column}'", fix="each preference row needs chosen and rejected")
        if prompt is None:
            prompt, chosen, rejected = _split_implicit(chosen, rejected, where)
        _check_prompt(prompt, where)
        chosen, rejected = _response_text(chosen, where, "chosen"), _response_text(rejected, where, "rejected")
        out.append(Comparison(prompt, chosen, rejected, group=i))
    return out


def _response_text(value: Any, where: str, column: str) -> str:
    """A response as plain text: a string, or exactly one assistant message."""
    if isinstance(value, str) and value.strip():
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise DataError(f"{where}: '{column}' must be a non-empty string or one assistant message after the prompt, "
                    f"got {str(value)[:80]!r}",
                    fix="put the conversation so far in 'prompt' and only the final assistant turn in "
                        "chosen/rejected")


def _split_implicit(chosen: Any, rejected: Any, where: str) -> tuple[Prompt, Any, Any]:
    """Implicit prompt: the shared prefix of chosen and rejected (whole messages, or text up to a space)."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError(f"{where}: chosen and rejected share no leading messages, so the prompt is unknown",
                            fix="add a 'prompt' column, or start both conversations with the same user turn")
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        # Cut at the last space of the shared part so a word both answers start with is not split.
        cut = chosen.rfind(" ", 0, n) + 1 if n < min(len(chosen), len(rejected)) else n
        if chosen[:cut].strip() == "":
            raise DataError(f"{where}: chosen and rejected share no prompt prefix, so the prompt is unknown",
                            fix="add a 'prompt' column (TRL's explicit-prompt preference format)")
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists",
                    fix="use one of TRL's preference formats (docs/FORMATS.md)")


def detect_format(columns: Sequence[str], source: str) -> str:
    """'rankings' or 'preferences' from a table's columns; DataError naming both formats otherwise."""
    if all(c in columns for c in RANKING_COLUMNS):
        if not ("ranks" in columns or "scores" in columns):
            raise DataError(f"reward data '{source}' has prompt/responses but neither 'ranks' nor 'scores'",
                            fix="label the candidates first (`lora-rlhf compare` with compare.labeler, or by "
                                "hand), see docs/FORMATS.md")
        return "rankings"
    if all(c in columns for c in PREFERENCE_COLUMNS):
        return "preferences"
    raise DataError(f"reward data '{source}' has columns {list(columns)} but needs rankings "
                    "(prompt, responses, ranks | scores) or preferences (chosen, rejected, optional prompt)",
                    fix="rename the columns, or convert the file to one of the formats in docs/FORMATS.md")


def to_comparisons(rows: list[dict[str, Any]], columns: Sequence[str], source: str,
                   pairs: PairRule = "all") -> list[Comparison]:
    """Any supported reward data -> comparisons; at least one, else DataError. `pairs` applies to rankings (a
    preference row is one pair already). Pairs with chosen == rejected are dropped (a DataError when that leaves
    none); pairs ranked both ways are reported (`contradictions`)."""
    fmt = detect_format(columns, source)
    comparisons = (rankings_to_comparisons(rows, source, pairs) if fmt == "rankings"
                   else preferences_to_comparisons(rows, source))
    if not comparisons:
        raise DataError(f"reward data '{source}' gives no comparisons (every line is skipped)",
                        fix="label at least one prompt")
    same = [c for c in comparisons if c.chosen == c.rejected]
    if same:
        lines = sorted({c.group + 1 for c in same})
        where = f"line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines[:EXAMPLES]))}" + (
            f" and {len(lines) - EXAMPLES} more" if len(lines) > EXAMPLES else "")
        if len(same) == len(comparisons):
            raise DataError(f"reward data '{source}': in every one of its {len(same)} pairs the chosen response is "
                            "the same text as the rejected one, so there is nothing to learn (the loss stays at "
                            "ln 2)", fix="check the chosen/rejected columns (or the ranked responses): they must "
                                         "hold different answers")
        log.warning("reward data '%s': %d pair(s) whose chosen and rejected texts are identical (%s) are dropped: "
                    "they carry no preference", source, len(same), where)
        comparisons = [c for c in comparisons if c.chosen != c.rejected]
    both_ways = contradictions(comparisons, rows)
    if both_ways:
        shown = "; ".join(both_ways[:EXAMPLES]) + (f"; and {len(both_ways) - EXAMPLES} more"
                                                    if len(both_ways) > EXAMPLES else "")
        log.warning("reward data '%s': %d response pair(s) are ranked both ways (the same prompt and responses in "
                    "opposite order), so their comparisons cancel out: %s. One labeler twice is likely a mistake; "
                    "two labelers, a disagreement (the paper's labelers agreed ~73 %% of the time)",
                    source, len(both_ways), shown)
    return comparisons


def contradictions(comparisons: Sequence[Comparison], rows: Sequence[dict[str, Any]]) -> list[str]:
    """One description per response pair of one prompt that is ranked both ways: which lines (and labelers) say
    which. [] when the data agrees with itself."""
    seen: dict[tuple[str, str, str], set[int]] = {}  # (prompt, winner, loser) -> source lines
    for c in comparisons:
        seen.setdefault((json.dumps(c.prompt, sort_keys=True), c.chosen, c.rejected), set()).add(c.group)

    def who(group: int) -> str:
        labeler = rows[group].get("labeler") if group < len(rows) else None
        return f"line {group + 1}" + (f" ({labeler})" if isinstance(labeler, str) else "")

    found = []
    for (prompt, chosen, rejected), groups in seen.items():
        other = seen.get((prompt, rejected, chosen))
        if other and chosen < rejected:  # each pair once
            found.append(f"{', '.join(who(g) for g in sorted(groups))} prefer {_short(chosen)} to {_short(rejected)}"
                         f", {', '.join(who(g) for g in sorted(other))} the reverse")
    return found


def _short(text: str, width: int = 30) -> str:
    return repr(text if len(text) <= width else text[:width - 3] + "...")


def load_comparisons(cfg: DatasetConfig, seed: int = 0, pairs: PairRule = "all", what: str = "reward dataset",
                     key: str = "data.reward") -> tuple[list[Comparison], list[Comparison] | None]:
    """A dataset of rankings or preferences (the recipe's `key`) -> (train, held-out or None) comparisons. Held
    out by prompt line (`cfg.eval_fraction` of them, seeded), never by pair, so no prompt has pairs on both
    sides."""
    ds = load_table(cfg, seed, what=what)
    comparisons = to_comparisons(ds.to_list(), ds.column_names, cfg.path, pairs)
    if cfg.eval_fraction <= 0:
        return comparisons, None
    groups = sorted({c.group for c in comparisons})
    if len(groups) < 2:
        raise DataError(f"cannot hold out {cfg.eval_fraction:.0%} of {what} '{cfg.path}' with {len(groups)} labeled "
                        "line", fix=f"add lines, or set {key}.eval_fraction: 0")
    random.Random(seed).shuffle(groups)
    held = set(groups[:max(1, round(len(groups) * cfg.eval_fraction))])
    return [c for c in comparisons if c.group not in held], [c for c in comparisons if c.group in held]
