"""Files written so that an interruption never leaves half of one, and JSONL read with line-numbered errors.

Every file another step relies on is written to a temporary sibling and renamed into place (atomic on POSIX):
a reader sees the old file or the new one, never a mix. JSON has no NaN or inf: they are written as null.

A full disk is recognised whoever wrote: Python's own writes raise OSError(ENOSPC), but safetensors, torch.save
and tokenizers raise errors without an errno. `writing(path)` turns those into OSError(ENOSPC) naming `path`
(`disk_full` reads their text, else the free space left), so one handler reports every full disk.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lora_rlhf.errors import DataError


def clean_json(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), Paths -> strings, tuples -> lists, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# How the libraries that write without Python's io say it (safetensors and tokenizers pass on Rust's io::Error
# text; torch.save's zip writer says "file write failed" or "unexpected pos" instead, caught by the free space).
_DISK_FULL_TEXT = ("no space left", "os error 28", "os error 122", "disk quota exceeded", "storagefull")
LOW_SPACE = 16 * 2**20  # bytes: a write that fails with less than this free on its disk failed for want of space
TEMP_FILES = (".tmp*", "*.tmp")  # safetensors writes through ".tmpXXXXXX" (Rust's tempfile); write_text_atomic's


def free_space(path: str | Path) -> int | None:
    """Bytes free for this user on the disk that holds `path` (or the nearest folder above it that exists)."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def disk_full(error: BaseException, path: str | Path | None = None) -> bool:
    """Whether `error`, raised while writing `path`, means its disk is full (or over quota). Without `path`, only
    the error itself is read."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in DISK_FULL
    text = str(error).lower()
    if any(marker in text for marker in _DISK_FULL_TEXT):
        return True
    free = free_space(path) if path is not None else None
    return free is not None and free < LOW_SPACE


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Writes to `path` (a file, or a folder being filled) inside the block: a failure that means a full disk is
    raised as OSError(ENOSPC) whose filename is `path` (or the file Python's own error named), whichever library
    failed; any other error passes unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL and not e.filename:  # a failed write() names no file, unlike open()
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except Exception as e:
        if disk_full(e, path):
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise OSError(errno.ENOSPC, f"No space left on device ({type(e).__name__}: {detail})", str(path)) from e
        raise


def remove_temp_files(folder: str | Path) -> None:
    """Delete the temporary files a write killed half-way leaves in `folder` (not below it): a later run that
    reuses the folder would otherwise finish with them inside."""
    folder = Path(folder)
    for pattern in TEMP_FILES:
        for path in folder.glob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(tmp):
            tmp.write_text(text, encoding="utf-8")
    except Exception:
        tmp.unlink(missing_ok=True)  # what a full disk let through is no use, and holds space
        raise
    tmp.replace(path)


def write_json_atomic(path: str | Path, data: Any, sort_keys: bool = False) -> None:
    write_text_atomic(path, json.dumps(clean_json(data), indent=2, ensure_ascii=False, sort_keys=sort_keys))


def write_jsonl_atomic(path: str | Path, rows: list[Any]) -> None:
    write_text_atomic(path, "".join(json.dumps(clean_json(r), ensure_ascii=False) + "\n" for r in rows))


UTF8_FIX = ("re-save it as UTF-8: in an editor, 'Save as' with encoding UTF-8; or "
            "`iconv -f LATIN1 -t UTF-8 FILE > FILE.utf8` (use the file's real encoding, e.g. CP1252 or UTF-16)")


def check_utf8(path: str | Path, what: str = "file") -> None:
    """Raise one DataError naming the line and byte of the first invalid UTF-8 sequence in `path`.

    Libraries that read the file later (datasets, pandas, json) fail on such a byte with a raw
    UnicodeDecodeError deep in their stack, or worse, replace it silently.
    """
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):  # big chunks: the common, valid case costs one pass at disk speed
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        return
    except UnicodeDecodeError:
        pass
    # Only on failure: find the line, for a message the user can act on. b"\n" never occurs inside a UTF-8
    # multi-byte sequence, so the bad bytes lie within one line.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{what} '{path}' is not UTF-8 text: line {lineno}, byte {e.start + 1} of that "
                                f"line is 0x{raw[e.start]:02x}", fix=UTF8_FIX) from None
    raise DataError(f"{what} '{path}' is not UTF-8 text", fix=UTF8_FIX)  # it changed since the first read


def require_file(path: str | Path, what: str = "file", fix: str = "check the path") -> Path:
    """`path`, when it is a file; else one DataError that says whether it is missing or a folder."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{what} '{path}' is a folder, not a file", fix=fix)
    if not path.is_file():
        raise DataError(f"{what} '{path}' does not exist", fix=fix)
    return path


def read_jsonl(path: str | Path, what: str = "file", problems: list[str] | None = None,
               fix: str = "check the path", cut_short_tail: bool = False) -> list[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line, numbered from 1 as an editor shows them.

    A line that is not JSON is one DataError naming the file and the line, or, given `problems`, is appended
    there ("line N: bad JSON (...)") and skipped, for callers that report every problem of a file at once.
    `cut_short_tail`: for our own appended logs (PPO's metrics.jsonl and samples.jsonl), whose writer ends every
    whole line with a newline: a last line without one that is not JSON was cut short by a killed run and is
    left out. Every JSONL file is read here: user files (stats, score's pairs, candidates, and the stages' data when
    `datasets` cannot parse a .jsonl file) and our logs; only the labelling store reads its own way (it follows
    a file other processes append to, from a byte offset, under a lock).
    """
    path = require_file(path, what, fix)
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    rows.append((lineno, json.loads(text)))
                except json.JSONDecodeError as e:
                    if cut_short_tail and not text.endswith("\n"):
                        continue  # the last line, cut short
                    problem = f"line {lineno}: bad JSON ({e.msg} at column {e.colno})"
                    if problems is None:
                        raise DataError(f"{what} '{path}' {problem}",
                                        fix="one JSON object per line; repair or delete that line") from None
                    problems.append(problem)
    except UnicodeDecodeError:
        check_utf8(path, what)  # raises the DataError that names the line
        raise
    return rows


@contextlib.contextmanager
def atomic_folder(dest: str | Path, replace: bool = False) -> Iterator[Path]:
    """Fill a temporary sibling of `dest`, then rename it to `dest`: an interruption leaves no half-filled folder.

    An existing `dest` must be empty unless `replace` (then it is removed just before the rename); the
    temporary folder is removed on any error.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest) if replace else dest.rmdir()
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


PREVIOUS = "previous-"  # OUT/<stage>/previous-N: an earlier finished run's outputs, kept by keep_previous


def keep_previous(folder: str | Path, marker: str, companions: Iterable[str] = ()) -> Path | None:
    """Before a rerun writes `folder`: when `folder/marker` exists (an earlier run finished there), move it and
    the `companions` that came with it into `folder/previous-N` (N one more than the highest there) and return
    that folder; else None. Nothing is ever deleted: rankings can be people's work, and an evaluation hours of it.

    The marker moves first, so an interruption in between leaves no finished-looking mix of old and new files;
    each move is a rename (atomic, and it needs no free space).
    """
    folder = Path(folder)
    if not (folder / marker).is_file():
        return None
    taken = [int(m.group(1)) for p in folder.glob(PREVIOUS + "*") if (m := re.fullmatch(PREVIOUS + r"(\d+)", p.name))]
    last = folder / f"{PREVIOUS}{max(taken, default=0)}"
    if taken and last.is_dir() and not any(last.iterdir()):  # a move killed right after its mkdir: use that folder
        kept = last
    else:
        kept = folder / f"{PREVIOUS}{max(taken, default=0) + 1}"
        kept.mkdir()
    for name in (marker, *companions):
        if (folder / name).is_file():
            (folder / name).rename(kept / name)
    return kept
