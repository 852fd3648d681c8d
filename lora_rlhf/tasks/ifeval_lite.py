"""IFEval-lite: instructions with constraints a program can check (after Zhou et al. 2023, arXiv:2311.07911).

A prompt is a request plus one or two constraints written in natural language, e.g.

    Describe volcanoes in a few sentences. Answer in fewer than 40 words. Do not use any commas in your response.

Every constraint type has several phrasings (templates). The checker needs no side table: it finds the
phrasings in the prompt text with regexes built from the same templates, so any prompt this module wrote
(plain string, chat messages, or chat-templated text) can be judged from its text alone. Some phrasings are
held out (`seen=False`): the demo's eval set uses them to test whether what RLHF taught generalises.

Scores
    compliance      fraction of the prompt's constraints met (IFEval's instruction-level strict accuracy)
    soft credit     in [0, 1], equal to 1 exactly when a constraint is met and graded below that (e.g. 35 words
                    against a limit of 30 earns more than 90): fewer ties, so more comparisons for the reward
                    model and a denser signal for PPO.
A response of fewer than MIN_WORDS words answers nothing and scores 0 on everything, so that "say nothing"
cannot satisfy "use no capital letters".

Labelers (for `compare.labeler`, `ppo.reward_fn`, `eval.labeler` as `lora_rlhf.tasks.ifeval_lite:<name>`)
    rank(prompt, responses) -> list[float]         soft credit (compare.labeler)
    reward(prompts, responses) -> list[float]      soft credit (ppo.reward_fn)
    compliance(prompt, responses) -> list[float]   strict fraction met (eval.labeler)
    score(prompt, response) -> float               strict fraction met, one response
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lora_rlhf.errors import DataError

MIN_WORDS = 3
Spec = dict[str, Any]  # {"type": "max_words", "n": 40}

# ---------------------------------------------------------------------------------------------- phrasings
# type -> [(template, seen)]. Placeholders: {n} an integer, {phrase} text in double quotes, {word} one word.
PHRASINGS: dict[str, list[tuple[str, bool]]] = {
    "lowercase": [
        ("Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.", True),
        ("Write your whole answer in lowercase letters only.", True),
        ("Please reply using only lowercase letters.", True),
        ("Do not use any capital letters anywhere in your reply.", False),
    ],
    "uppercase": [
        ("Your entire response should be in English, and in all capital letters.", True),
        ("Write your whole answer in uppercase letters only.", True),
        ("Reply entirely in block capitals.", False),
    ],
    "max_words": [
        ("Answer in fewer than {n} words.", True),
        ("Your response must contain less than {n} words.", True),
        ("Keep your reply under {n} words.", True),
        ("Do not write {n} words or more.", False),
    ],
    "end_with": [
        ('End your response with the exact phrase "{phrase}".', True),
        ('Finish your answer with "{phrase}" and nothing after it.', True),
        ('The last words of your reply must be "{phrase}".', True),
        ('Make sure the final words of your reply are "{phrase}".', False),
    ],
    "no_commas": [
        ("Do not use any commas in your response.", True),
        ("Your reply must not contain a single comma.", True),
        ("Avoid commas entirely.", True),
        ("Write without using the comma character.", False),
    ],
    "quoted": [
        ("Wrap your entire response with double quotation marks.", True),
        ("Put your whole answer inside double quotes.", True),
        ("Enclose the full reply in double quotation marks.", False),
    ],
    "start_with": [
        ('Start your response with the word "{word}".', True),
        ('The first word of your answer must be "{word}".', True),
        ('Open your reply with the word "{word}".', False),
    ],
    "bullets": [
        ('Your answer must contain exactly {n} bullet points, each on its own line starting with "* ".', True),
        ("Give exactly {n} bullet points in markdown format.", True),
        ("Format the answer as a markdown list of exactly {n} items.", False),
    ],
    "json": [
        ("Wrap your entire output in JSON format.", True),
        ("Your entire reply must be valid JSON.", True),
        ("Respond only with a valid JSON object.", False),
    ],
    "keyword": [
        ('Include the keyword "{word}" in your response.', True),
        ('Make sure to use the word "{word}" at least once.', True),
        ('Your answer should mention the word "{word}".', False),
    ],
}

# Pairs that cannot both hold (or that IFEval also keeps apart); JSON combines only with these two.
CONFLICTS = {frozenset(("lowercase", "uppercase")), frozenset(("bullets", "quoted")),
             frozenset(("bullets", "start_with"))}
JSON_COMPATIBLE = {"keyword", "max_words"}

_SLOTS = {"n": r"(?P<n>\d+)", "phrase": r'(?P<phrase>[^"\n]+?)', "word": r"(?P<word>[A-Za-z]+)"}


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(p) if i % 2 == 0 else _SLOTS[p] for i, p in enumerate(parts))
    return re.compile(pattern)


_PARSERS = [(ctype, i, _template_regex(t)) for ctype, ts in PHRASINGS.items() for i, (t, _) in enumerate(ts)]


def compatible(a: str, b: str) -> bool:
    if a == b or frozenset((a, b)) in CONFLICTS:
        return False
    if "json" in (a, b):
        return (b if a == "json" else a) in JSON_COMPATIBLE
    return True


def render(spec: Spec, phrasing: int) -> str:
    """The sentence that asks for `spec`, in phrasing number `phrasing` of its type."""
    template, _ = PHRASINGS[spec["type"]][phrasing]
    return template.format(**{k: v for k, v in spec.items() if k != "type"})


def _prompt_text(prompt: str | list[dict[str, str]]) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m.get("content", "") for m in prompt if m.get("role") == "user")


def parse_constraints(prompt: str | list[dict[str, str]]) -> list[Spec]:
    """The constraints a prompt asks for, in the order they appear (found from their phrasing)."""
    text = _prompt_text(prompt)
    found: list[tuple[int, Spec]] = []
    for ctype, _, regex in _PARSERS:
        for m in regex.finditer(text):
            spec: Spec = {"type": ctype}
            for key, value in m.groupdict().items():
                spec[key] = int(value) if key == "n" else value
            found.append((m.start(), spec))
    found.sort(key=lambda x: x[0])
    specs: list[Spec] = []
    for _, spec in found:
        if spec not in specs:
            specs.append(spec)
    return specs


# ---------------------------------------------------------------------------------------------- checkers
_WORD = re.compile(r"\w+(?:['\u2019-]\w+)*")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def _strip_wrapping(text: str) -> str:
    """Ignore surrounding quotes and markdown markers, so "quoted" combines with start/end constraints."""
    return text.strip().strip('"\u201c\u201d').strip()


def _letters(text: str) -> list[str]:
    return [c for c in text if c.isalpha()]


def _case(text: str, upper: bool) -> float:
    letters = _letters(text)
    if not letters:
        return 0.0
    wrong = sum(1 for c in letters if (c.islower() if upper else c.isupper()))
    return 1.0 if wrong == 0 else 0.5 * (1 - wrong / len(letters))


def _max_words(text: str, n: int) -> float:
    count = len(words(text))
    return 1.0 if count < n else 0.5 * n / count


def _end_with(text: str, phrase: str) -> float:
    body, target = _strip_wrapping(text).lower(), phrase.strip().lower()
    if body.endswith(target):
        return 1.0
    return 0.5 if target in body else 0.0


def _no_commas(text: str) -> float:
    commas = text.count(",") + text.count("\uff0c")
    return 1.0 if commas == 0 else 0.5 / commas


def _quoted(text: str) -> float:
    body = text.strip()
    starts, ends = body[:1] in ('"', "\u201c"), body[-1:] in ('"', "\u201d")
    if len(body) > 1 and starts and ends:
        return 1.0
    return 0.5 if starts or ends else 0.0


def _start_with(text: str, word: str) -> float:
    body = _strip_wrapping(text).lstrip("*-#>` \t\n")
    first = words(body[:80])
    if first and first[0].lower() == word.lower():
        return 1.0
    return 0.25 if word.lower() in (w.lower() for w in words(body)) else 0.0


_BULLET = re.compile(r"^\s*[*\-\u2022]\s+\S", re.MULTILINE)
_BULLET_MARK = re.compile(r"^\s*[*\-\u2022]\s+", re.MULTILINE)


def count_bullets(text: str) -> int:
    return len(_BULLET.findall(text))


def _bullets(text: str, n: int) -> float:
    k = count_bullets(text)
    return 1.0 if k == n else 0.5 * (1 - abs(k - n) / max(k, n))


def _json_body(text: str) -> str:
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json|JSON)?\s*\n?(.*?)\n?```", body, re.DOTALL)
    return fenced.group(1).strip() if fenced else body


def _json(text: str) -> float:
    body = _json_body(text)
    try:
        json.loads(body)
        return 1.0
    except ValueError:
        pass
    # Partial credit for a parsable object somewhere inside prose.
    start, end = body.find("{"), body.rfind("}")
    if 0 <= start < end:
        try:
            json.loads(body[start:end + 1])
            return 0.5
        except ValueError:
            pass
    return 0.0


def _keyword(text: str, word: str) -> float:
    return 1.0 if re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) else 0.0


CHECKERS: dict[str, Callable[..., float]] = {
    "lowercase": lambda t: _case(t, upper=False),
    "uppercase": lambda t: _case(t, upper=True),
    "max_words": lambda t, n: _max_words(t, n),
    "end_with": lambda t, phrase: _end_with(t, phrase),
    "no_commas": _no_commas,
    "quoted": _quoted,
    "start_with": lambda t, word: _start_with(t, word),
    "bullets": lambda t, n: _bullets(t, n),
    "json": _json,
    "keyword": lambda t, word: _keyword(t, word),
}


def check(spec: Spec, response: str) -> float:
    """Soft credit of `response` for one constraint: 1.0 exactly when it is met."""
    if len(words(response)) < MIN_WORDS:
        return 0.0
    return CHECKERS[spec["type"]](response, **{k: v for k, v in spec.items() if k != "type"})


@dataclass
class Judgement:
    met: list[bool]
    soft: list[float]

    @property
    def compliance(self) -> float:
        return sum(self.met) / len(self.met)

    @property
    def soft_score(self) -> float:
        return sum(self.soft) / len(self.soft)


def judge(prompt: str | list[dict[str, str]], response: str, specs: list[Spec] | None = None) -> Judgement:
    specs = parse_constraints(prompt) if specs is None else specs
    if not specs:
        raise DataError(f"prompt {_prompt_text(prompt)[:100]!r} states no constraint this checker knows",
                        fix="use prompts written by lora_rlhf.tasks.demo_data (or the phrasings in "
                            "lora_rlhf.tasks.ifeval_lite.PHRASINGS), or another labeler")
    soft = [check(s, response) for s in specs]
    return Judgement(met=[s >= 1.0 for s in soft], soft=soft)


# ---------------------------------------------------------------------------------------------- labelers
def score(prompt: str | list[dict[str, str]], response: str | list[str]) -> float | list[float]:
    """Strict compliance of one response: the fraction of the prompt's constraints it meets.

    Given a list of responses it returns a list (like `compliance`), so it also works as a labeler.
    """
    if isinstance(response, list):
        return compliance(prompt, response)
    return judge(prompt, response).compliance


def compliance(prompt: str | list[dict[str, str]], responses: list[str]) -> list[float]:
    """eval.labeler: strict compliance of each response."""
    specs = parse_constraints(prompt)
    return [judge(prompt, r, specs).compliance for r in responses]


def rank(prompt: str | list[dict[str, str]], responses: list[str]) -> list[float]:
    """compare.labeler: soft credit of each response (higher is better)."""
    specs = parse_constraints(prompt)
    return [judge(prompt, r, specs).soft_score for r in responses]


def reward(prompts: list[Any], responses: list[str]) -> list[float]:
    """ppo.reward_fn: soft credit of each (prompt, response) pair."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [judge(p, r).soft_score for p, r in zip(prompts, responses, strict=True)]


# ---------------------------------------------------------------------------------------------- repair
def repair(prompt: str | list[dict[str, str]], response: str) -> str:
    """Edit `response` by rule until it meets the prompt's constraints (for demonstrations when no sample did).

    The edits are blunt (truncate, lowercase, strip commas, wrap in quotes, reformat as bullets or JSON); the
    result is checked by the caller. Order matters: structure first, then the first/last words, then the
    character-level rules that must hold over everything added before.
    """
    specs = parse_constraints(prompt)
    types = {s["type"]: s for s in specs}
    text = response.strip()
    # Words the later edits add (first word, keyword, end phrase, the JSON key) come out of the word budget.
    budget = None
    if "max_words" in types:
        budget = types["max_words"]["n"] - 1 - len(words(types.get("end_with", {}).get("phrase", "")))
        budget -= sum(1 for t in ("start_with", "json") if t in types)
    if "keyword" in types and not _keyword(text, types["keyword"]["word"]):
        # In front, so that truncation keeps it.
        text = f"{types['keyword']['word'].capitalize()}: {text}"
    if "bullets" in types:
        n = types["bullets"]["n"]
        items = _sentences(_BULLET_MARK.sub("", text)) or [text]
        items = (items * n)[:n] if len(items) < n else items[: n - 1] + [" ".join(items[n - 1:])]
        if budget is not None:
            items = [_truncate_words(s, max(budget // n, 1)) for s in items]
        text = "\n".join(f"* {s}" for s in items)
    elif budget is not None:
        text = _truncate_words(text, max(budget, MIN_WORDS))
    if "json" in types:
        text = json.dumps({"answer": text})
    if "start_with" in types:
        word = types["start_with"]["word"]
        if not (words(text) and words(text)[0].lower() == word.lower()):
            text = f"{word}, {text}" if "no_commas" not in types else f"{word} {text}"
    if "end_with" in types:
        phrase = types["end_with"]["phrase"]
        if not _strip_wrapping(text).lower().endswith(phrase.lower()):
            text = f"{text.rstrip()} {phrase}"
    if "quoted" in types:
        text = f'"{text}"'
    if "no_commas" in types:
        text = text.replace(",", "")
    if "lowercase" in types:
        text = text.lower()
    if "uppercase" in types:
        text = text.upper()
    return text


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(words(s)) > 0]


def _truncate_words(text: str, n: int) -> str:
    """Keep the first n words (with their punctuation and line breaks)."""
    matches = list(_WORD.finditer(text))
    if len(matches) <= n:
        return text
    return text[: matches[n - 1].end()].rstrip(",;:") + "."
