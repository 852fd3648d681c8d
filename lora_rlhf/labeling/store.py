"""The Rankings JSONL as a shared, append-only log.

Each judgement is one line written with ONE write() under an exclusive flock, then fsync'ed: a line is either
fully in the file or not at all, and writers in other threads or processes (several labelers, several servers)
never interleave. Under the same lock a writer first reads the lines others appended since it last looked, so
the same labeler can never record the same prompt twice (two tabs, a restarted server), while other labelers'
lines are simply kept. POSIX only (fcntl).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from lora_rlhf.errors import DataError


def check_output_path(path: str | Path) -> Path:
    """Fail early (before any labelling) when the rankings file cannot be appended to. Creates nothing."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise DataError(f"output '{path}' is a directory", fix="pass a file path, e.g. --out rankings.jsonl")
    if not parent.is_dir():
        raise DataError(f"cannot write '{path}': folder '{parent}' does not exist",
                        fix=f"create it first (mkdir -p {parent}) or choose another --out")
    try:
        if path.exists():
            with path.open("ab"):  # opening for append writes nothing
                pass
        else:
            # A real probe (not os.access): it also catches read-only mounts, ACLs and root-proof filesystems.
            with tempfile.NamedTemporaryFile(dir=parent, prefix=".lora-rlhf-probe-"):
                pass
    except OSError as e:
        raise DataError(f"cannot write '{path}': {e.strerror}",
                        fix="choose an --out in a folder you can write to, or fix its permissions") from None
    return path


class RankingStore:
    """Append-only rankings file; knows which prompt ids each labeler has already judged (labeled or skipped)."""

    def __init__(self, path: str | Path):
        self.path = check_output_path(path)
        self._mutex = threading.Lock()  # in-process state; flock below serialises processes
        self._offset = 0  # bytes of the file already parsed
        self._lineno = 0
        self._done: dict[str, set[str]] = {}
        self.lines_written = 0
        with self._mutex:
            self._catch_up()

    def _catch_up(self, hold_shared_lock: bool = True) -> None:
        """Parse complete lines appended since the last look (by anyone). Caller holds self._mutex.

        Not core.io.read_jsonl, which reads a whole file once: this follows a file other processes append to, from
        the byte offset it reached, and here a torn last line is an error rather than a killed log's tail.

        Readers take a shared flock so they never see a line half-written; append() already holds the
        exclusive one (a second flock on another descriptor of this process would wait for itself).
        """
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return
        with f:
            if hold_shared_lock:
                fcntl.flock(f, fcntl.LOCK_SH)
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # every writer ends its line under the lock, so a tail without one is a torn write
            raise DataError(f"rankings file '{self.path}' ends with an incomplete line (an interrupted write?)",
                            fix="delete or complete its last line, then restart")
        for raw in data.splitlines():
            self._lineno += 1
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"rankings file '{self.path}' line {self._lineno} is not valid JSON ({e.msg})",
                                fix="repair or delete that line (each line is one judgement), then restart") from None
            except UnicodeDecodeError:
                raise DataError(f"rankings file '{self.path}' line {self._lineno} is not UTF-8 text",
                                fix="repair or delete that line (each line is one judgement), then restart") from None
            if isinstance(row, dict) and isinstance(row.get("labeler"), str) and "id" in row:
                self._done.setdefault(row["labeler"], set()).add(str(row["id"]))
        self._offset += len(data)

    def done_ids(self, labeler: str) -> set[str]:
        """Ids this labeler has judged, including lines other processes appended meanwhile."""
        with self._mutex:
            self._catch_up()
            return set(self._done.get(labeler, ()))

    def append(self, record: dict[str, Any]) -> bool:
        """Append one judgement; False (nothing written) when this labeler already judged this id."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        labeler, item_id = record["labeler"], str(record["id"])
        with self._mutex:
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._catch_up(hold_shared_lock=False)
                if item_id in self._done.get(labeler, ()):
                    return False
                if os.write(fd, line) != len(line):  # a regular file takes it whole, or the disk is full
                    raise OSError(f"short write to {self.path} (disk full?)")
                os.fsync(fd)
                self._offset += len(line)  # we hold the lock: nobody else wrote in between
                self._lineno += 1
                self._done.setdefault(labeler, set()).add(item_id)
                self.lines_written += 1
            finally:
                os.close(fd)  # releases the flock
            if created:
                _fsync_dir(self.path.parent)
            return True


def _fsync_dir(folder: Path) -> None:
    """Make a newly created file's directory entry durable too."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
