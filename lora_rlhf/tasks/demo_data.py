"""The demo's data, built offline: IFEval-lite prompts, general text for PPO-ptx and for the alignment tax.

    build(out_dir, seed, n_train, n_eval) writes
        prompts_train.jsonl   `prompt` (+ id, topic, constraints, split_kind="train")   compare and PPO rollouts
        prompts_eval.jsonl    disjoint held-out prompts; split_kind "seen" (new topic/phrasing combinations of
                              training material) or "unseen" (topics AND phrasings never used in training)
        ptx.jsonl             `text`: paragraphs of Python standard-library docstrings (PPO-ptx)
        general_eval.jsonl    `text`: docstring paragraphs of *other* stdlib modules (held-out perplexity)
    build_demonstrations(shared_base, prompts, n, ...) samples n responses per prompt from the base, keeps the
        best by the checker and writes sft.jsonl (prompt/completion): the toolkit's own demonstrations.

General text is real human-written English that every Python install carries (docstrings, read from the stdlib
source with `ast`, so `python -OO` does not empty it); it is split by module, so no paragraph of a module
used for PPO-ptx is ever scored as held out. Which paragraphs exist depends on the Python version: the files are
deterministic for one seed on one Python.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import re
import sysconfig
from pathlib import Path
from typing import Any

from lora_rlhf.core.generation import generate_responses
from lora_rlhf.core.io import write_jsonl_atomic
from lora_rlhf.tasks import ifeval_lite as ife

# Subjects of the requests. The last EVAL_ONLY_TOPICS never appear in training prompts.
TOPICS = [
    "the water cycle", "photosynthesis", "volcanoes", "honey bees", "the moon", "rainbows", "recycling",
    "a healthy breakfast", "learning a new language", "bicycles", "the internet", "coffee", "public libraries",
    "penguins", "solar panels", "chess", "baking bread", "gardening", "sleep", "exercise", "the ocean", "trees",
    "electric cars", "music lessons", "museums", "camping", "time management", "friendship", "reading books",
    "dinosaurs", "earthquakes", "clouds", "the human heart", "vaccines", "bridges", "trains", "city parks",
    "composting", "board games", "hiking", "snow", "deserts", "rivers", "the solar system", "robots",
    "writing emails", "saving money", "cooking pasta", "tea", "cats", "dogs", "owls", "whales", "forests",
    "mountains", "lighthouses", "kites", "paper", "maps", "clocks", "batteries", "magnets", "wind energy",
    "bird migration", "teamwork", "job interviews", "public speaking", "painting", "photography", "swimming",
    "football", "yoga", "vegetables", "cheese", "chocolate", "the printing press", "the telephone",
    "airplanes", "submarines", "glaciers", "coral reefs", "ants", "butterflies", "the four seasons",
    "rain forests", "stars", "comets", "telescopes", "microscopes", "computers", "strong passwords",
    "first aid", "drinking water", "traffic lights", "mushrooms", "olive oil", "rice", "fireworks",
    "handwriting", "poetry", "jazz", "the piano", "theater", "volunteering", "moving to a new city",
    "the postal service", "farming", "ocean tides", "thunderstorms", "fossils", "the pyramids of Egypt",
    "castles", "the Olympic Games", "sunflowers", "apples", "spiders", "frogs", "sharks", "elephants", "horses",
]
EVAL_ONLY_TOPICS = 24

FRAMES = [
    "Explain {t} to a ten-year-old.", "Describe {t} in a few sentences.", "What are the main benefits of {t}?",
    "Give some advice about {t}.", "Write a short paragraph about {t}.", "Why do people care about {t}?",
    "Tell me some interesting facts about {t}.",
]

PARAMS = {
    "max_words": {"n": [25, 40, 60]},
    "end_with": {"phrase": ["Thank you for reading.", "That is all.", "Have a nice day!", "Any other questions?",
                            "Hope this helps."]},
    "start_with": {"word": ["Sure", "Yes", "Well", "Today", "First", "Honestly"]},
    "bullets": {"n": [2, 3, 4]},
    "keyword": {"word": ["simple", "important", "nature", "history", "example", "people"]},
}
TWO_CONSTRAINTS = 0.4  # share of prompts with two constraints


def _phrasings(ctype: str, seen: bool) -> list[int]:
    return [i for i, (_, s) in enumerate(ife.PHRASINGS[ctype]) if s == seen]


def check_types(types: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The constraint types to draw from (None: all of them); an unknown name raises ValueError."""
    if types is None:
        return tuple(ife.PHRASINGS)
    unknown = [t for t in types if t not in ife.PHRASINGS]
    if unknown or not types:
        raise ValueError(f"constraint types {unknown or '[]'} are not known; choose from {list(ife.PHRASINGS)}")
    return tuple(types)


def make_prompt(rng: random.Random, topics: list[str], seen_phrasings: bool,
                types: tuple[str, ...] | None = None) -> dict[str, Any]:
    """One request with one or two compatible constraints of `types` (None: all), all from the given pools."""
    topic = rng.choice(topics)
    question = rng.choice(FRAMES).format(t=topic)
    question = question[0].upper() + question[1:]
    # Only types that have a phrasing in the asked pool (every type has both kinds today).
    types = [t for t in check_types(types) if _phrasings(t, seen_phrasings)]
    first = rng.choice(types)
    chosen = [first]
    if rng.random() < TWO_CONSTRAINTS:
        options = [t for t in types if ife.compatible(first, t)]
        if options:
            chosen.append(rng.choice(options))
    specs, sentences = [], []
    for ctype in chosen:
        spec: dict[str, Any] = {"type": ctype}
        for key, values in PARAMS.get(ctype, {}).items():
            spec[key] = rng.choice(values)
        specs.append(spec)
        sentences.append(ife.render(spec, rng.choice(_phrasings(ctype, seen_phrasings))))
    return {"prompt": " ".join([question, *sentences]), "topic": topic, "constraints": specs}


def build_prompts(seed: int, n_train: int, n_eval: int,
                  types: tuple[str, ...] | None = None) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows): eval is half "seen" (held-out combinations), half "unseen" (new topics+phrasings).

    `types` limits the constraint types of every prompt, train and eval alike (None: all).
    """
    rng = random.Random(seed)
    types = check_types(types)
    train_topics, eval_topics = TOPICS[:-EVAL_ONLY_TOPICS], TOPICS[-EVAL_ONLY_TOPICS:]
    train, texts = _unique(rng, n_train, lambda: make_prompt(rng, train_topics, True, types), set(), "train")
    n_unseen = n_eval // 2
    seen, texts = _unique(rng, n_eval - n_unseen, lambda: make_prompt(rng, train_topics, True, types), texts,
                          "seen")
    unseen, _ = _unique(rng, n_unseen, lambda: make_prompt(rng, eval_topics, False, types), texts, "unseen")
    for prefix, rows in (("train", train), ("eval", seen + unseen)):
        for i, row in enumerate(rows):
            row["id"] = f"{prefix}-{i:05d}"
    return train, seen + unseen


def _unique(rng: random.Random, n: int, make, taken: set[str], kind: str) -> tuple[list[dict], set[str]]:
    rows, taken, misses = [], set(taken), 0
    # Give up after a long run of duplicates: the pool of combinations is (nearly) exhausted.
    while len(rows) < n and misses < 2000:
        row = make()
        if row["prompt"] in taken:
            misses += 1
            continue
        misses = 0
        taken.add(row["prompt"])
        rows.append({**row, "split_kind": kind})
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} distinct {kind} prompts can be made; ask for fewer")
    return rows, taken


# ---------------------------------------------------------------------------------------------- general text
@functools.cache
def stdlib_paragraphs(min_words: int = 25, max_words: int = 120) -> dict[str, tuple[str, ...]]:
    """module name -> prose paragraphs of its docstrings (code examples and tables left out), sorted.

    Cached: parsing the standard library takes a few seconds and its files do not change in a process.
    """
    lib = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[str]] = {}
    for path in sorted(lib.glob("*.py")):
        if path.stem.startswith("_"):  # private C-accelerator shims: terse, often duplicated elsewhere
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        paragraphs: list[str] = []
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for para in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                if _is_prose(para, min_words, max_words):
                    paragraphs.append(" ".join(para.split()))
        if paragraphs:
            out[path.stem] = tuple(sorted(set(paragraphs)))
    return out


def _is_prose(para: str, min_words: int, max_words: int) -> bool:
    tokens = para.split()
    if not min_words <= len(tokens) <= max_words or ">>>" in para:
        return False
    # Indented lines are code or tables; prose is mostly plain words.
    if any(line.startswith(("    ", "\t")) for line in para.splitlines()[1:]):
        return False
    wordlike = sum(1 for t in tokens if re.fullmatch(r"[A-Za-z][a-z]*[,.;:!?]?", t))
    return wordlike / len(tokens) >= 0.75


def _held_out(module: str, fraction: float) -> bool:
    digest = hashlib.sha256(module.encode()).digest()
    return digest[0] / 256 < fraction


def general_text(seed: int, n_ptx: int, n_general: int, eval_fraction: float = 0.25) -> tuple[list[str], list[str]]:
    """(ptx paragraphs, held-out paragraphs) from disjoint sets of stdlib modules."""
    by_module = stdlib_paragraphs()
    ptx = [p for m, ps in by_module.items() if not _held_out(m, eval_fraction) for p in ps]
    held = [p for m, ps in by_module.items() if _held_out(m, eval_fraction) for p in ps]
    rng = random.Random(seed)
    rng.shuffle(ptx)
    rng.shuffle(held)
    return ptx[:n_ptx], held[:n_general]


# ---------------------------------------------------------------------------------------------- files
def build(out_dir: str | Path, seed: int = 0, n_train: int = 256, n_eval: int = 64, n_ptx: int = 512,
          n_general: int = 128, types: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write the demo's prompt and text files into `out_dir`; return {name: path}."""
    train, evaluation = build_prompts(seed, n_train, n_eval, types)
    ptx, general = general_text(seed, n_ptx, n_general)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"prompts_train": train, "prompts_eval": evaluation,
             "ptx": [{"text": t} for t in ptx], "general_eval": [{"text": t} for t in general]}
    paths = {}
    for name, rows in files.items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl_atomic(paths[name], rows)
    return paths


# ---------------------------------------------------------------------------------------------- demonstrations
def best_of(prompt: Any, samples: list[str], allow_repair: bool = True) -> dict[str, Any] | None:
    """The best sample by (strict compliance, soft credit); if none complies fully, a repaired copy of the best.

    Returns {"completion", "compliance", "repaired"} or None when even the repair fails the checker.
    """
    specs = ife.parse_constraints(prompt)
    judged = [(ife.judge(prompt, s, specs), s) for s in samples]
    best_j, best = max(judged, key=lambda x: (x[0].compliance, x[0].soft_score, -len(x[1])))
    if best_j.compliance == 1.0 or not allow_repair:
        return {"completion": best.strip(), "compliance": best_j.compliance, "repaired": False}
    fixed = ife.repair(prompt, best)
    if ife.judge(prompt, fixed, specs).compliance < 1.0:
        return None
    return {"completion": fixed, "compliance": 1.0, "repaired": True}


def build_demonstrations(shared_base: Any, prompts: list[Any], n: int = 4, out_path: str | Path | None = None,
                         role: str | None = None, max_new_tokens: int = 96, temperature: float = 0.9,
                         top_p: float = 0.95, allow_repair: bool = True, batch_size: int = 8) -> list[dict]:
    """Best-of-n demonstrations from the model itself, filtered by the checker (rejection sampling).

    Each prompt gets n samples from `role` (None: the bare base); the best is kept, repaired by rule when no
    sample complies (`repaired: true` in the row), and dropped when the repair fails too. Writes `out_path`
    (prompt/completion JSONL) when given and returns the rows.
    """
    samples = generate_responses(shared_base, prompts, role, max_new_tokens, temperature, top_p, n,
                                 batch_size=batch_size)
    rows: list[dict] = []
    for prompt, outs in zip(prompts, samples, strict=True):
        best = best_of(prompt, outs, allow_repair)
        if best is not None:
            rows.append({"prompt": prompt, **best})
    if out_path is not None:
        write_jsonl_atomic(Path(out_path), rows)
    return rows


def demonstration_stats(rows: list[dict], n_prompts: int) -> dict[str, float]:
    kept = len(rows)
    return {"prompts": n_prompts, "kept": kept, "repaired": sum(r["repaired"] for r in rows),
            "complied_without_repair": sum(not r["repaired"] and r["compliance"] == 1.0 for r in rows)}
