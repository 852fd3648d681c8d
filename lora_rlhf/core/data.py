"""Load and validate datasets before any model is loaded.

A dataset is a local .jsonl/.json/.csv/.parquet file or a Hub dataset id. Each stage states the formats it
accepts; a missing column, an empty table or a wrong type is reported with the file, the row and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_rlhf.core.io import check_utf8, read_jsonl, require_file
from lora_rlhf.errors import DataError
from lora_rlhf.recipe.config import DatasetConfig

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_FORMATS = (".jsonl", ".json", ".csv")  # read as UTF-8 text by datasets (parquet is binary)

# Stage formats: name -> required columns (TRL's dataset formats).
SFT_FORMATS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}


def load_table(cfg: DatasetConfig, seed: int = 0, what: str = "dataset"):
    """Read the rows of `cfg` as a `datasets.Dataset` (shuffled and cut to max_samples when asked)."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(cfg.path).expanduser()
    suffix = path.suffix.lower()
    if suffix in LOCAL_FORMATS or path.exists():
        require_file(path, f"{what} file",
                     fix="check data.*.path in the recipe (relative paths are read from the recipe's folder)")
        if suffix not in LOCAL_FORMATS:
            raise DataError(f"{what} file '{cfg.path}' has an unsupported extension '{suffix}'",
                            fix=f"use one of {', '.join(LOCAL_FORMATS)}")
        if path.stat().st_size == 0:
            raise DataError(f"{what} '{cfg.path}' is empty", fix="add rows, or point the recipe at another file")
        if suffix in TEXT_FORMATS:
            check_utf8(path, f"{what} file")
        try:
            ds = datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
        except Exception as e:  # malformed JSON/CSV: say which file (and, for JSONL, which line)
            if suffix == ".jsonl":
                read_jsonl(path, f"{what} file")  # raises the DataError naming the first line that is not JSON
            raise DataError(f"cannot parse {what} file '{cfg.path}': {_first_line(e)}",
                            fix="check that every line is one valid JSON object (jsonl) or the file is valid") from None
    else:
        try:
            ds = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split)
        except Exception as e:
            raise DataError(
                f"cannot load {what} '{cfg.path}' (split '{cfg.split}') from the Hub: "
                f"{type(e).__name__}: {_first_line(e)}",
                fix="check the dataset id, subset and split, and network access; or give a local file") from None
    if len(ds) == 0:
        raise DataError(f"{what} '{cfg.path}' is empty", fix="add rows, or point the recipe at another file")
    if cfg.max_samples is not None and cfg.max_samples < len(ds):
        ds = ds.shuffle(seed=seed).select(range(cfg.max_samples))
    return ds


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0][:300] if lines else type(error).__name__)


def require_columns(ds, formats: dict[str, tuple[str, ...]], what: str, source: str) -> str:
    """Return the name of the first format whose columns `ds` has, else raise naming what was found."""
    for name, columns in formats.items():
        if all(c in ds.column_names for c in columns):
            return name
    wanted = " or ".join("(" + ", ".join(c) + ")" for c in formats.values())
    raise DataError(f"{what} '{source}' has columns {ds.column_names} but needs {wanted}",
                    fix="rename the columns, or convert the file to one of the formats in docs/FORMATS.md")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def check_text_or_messages(ds, column: str, source: str, allow_messages: bool = True) -> None:
    """Every value of `column` is a non-empty string (or a list of {role, content} messages)."""
    for i, value in enumerate(ds[column]):
        ok = (isinstance(value, str) and value.strip() != "") or (allow_messages and _is_messages(value))
        if not ok:
            kind = "a non-empty string or a list of {role, content} messages" if allow_messages else "a non-empty string"
            raise DataError(f"'{source}' row {i}: column '{column}' must be {kind}, got {str(value)[:80]!r}",
                            fix="fix or drop that row")


def split_eval(ds, fraction: float, seed: int):
    """(train, eval or None). Eval gets at least one row when a fraction is asked for."""
    if fraction <= 0:
        return ds, None
    if len(ds) < 2:
        raise DataError(f"cannot hold out {fraction:.0%} of a dataset with {len(ds)} row",
                        fix="add rows, or set eval_fraction: 0")
    n_eval = max(1, round(len(ds) * fraction))
    parts = ds.train_test_split(test_size=n_eval, seed=seed)
    return parts["train"], parts["test"]


def load_sft_data(cfg: DatasetConfig | None, seed: int = 0):
    """Demonstrations for step 1 in one of TRL's formats -> (train, eval or None)."""
    if cfg is None:
        raise DataError("the recipe has no data.sft section, so SFT has no demonstrations to learn from",
                        fix="add `data: {sft: {path: demos.jsonl}}` with prompt/completion, messages or text rows")
    ds = load_table(cfg, seed, what="SFT dataset")
    fmt = require_columns(ds, SFT_FORMATS, "SFT dataset", cfg.path)
    for column in SFT_FORMATS[fmt]:
        check_text_or_messages(ds, column, cfg.path, allow_messages=fmt != "text")
    keep = list(SFT_FORMATS[fmt])
    ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
    return split_eval(ds, cfg.eval_fraction, seed)


def load_prompts(cfg: DatasetConfig | None, seed: int = 0, what: str = "prompts") -> list[Any]:
    """A `prompt` column (string or messages) -> list of prompts."""
    if cfg is None:
        raise DataError(f"the recipe has no data.{what} section", fix=f"add `data: {{{what}: {{path: prompts.jsonl}}}}` "
                        "with a `prompt` column")
    ds = load_table(cfg, seed, what=f"{what} dataset")
    require_columns(ds, {"prompt": ("prompt",)}, f"{what} dataset", cfg.path)
    check_text_or_messages(ds, "prompt", cfg.path)
    return list(ds["prompt"])
