"""Files in a run's workdir that survive a kill at any moment, and one writer per workdir.

- `lock(workdir)`: an exclusive `fcntl` lock on `DIR/.lock` held for the life of the process;
  a second process exits with `WorkdirLockedError` naming the holder. The kernel drops the
  lock when its holder dies (kill -9 included), so a stale lock never blocks the next run.
- `write_atomic(path, text)`: write a temporary file beside `path`, fsync, rename over it.
  A reader sees the old content or the new one, never a mix or an empty file.
  `atomic_path(path)` does the same for writers that want a file name (plots).
- `read_jsonl(path)` / `append_jsonl(path, record)`: append-only JSON lines. A torn last line
  (a kill mid-append) is reported with its file and line number and dropped; `repair_jsonl`
  cuts it off before the next append. A bad line elsewhere raises `CorruptFileError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterable, Mapping

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir."""


class CorruptFileError(ValueError):
    """A workdir file holds a line that is not JSON (not a torn last line)."""


class WorkdirLock:
    """An exclusive lock on `DIR/.lock`; release with `release()` or a `with` block."""

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise WorkdirLockedError(
                f"{workdir} is in use by another run ({holder}); wait for it to finish or "
                "use another workdir"
            ) from None
        os.ftruncate(self._fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}"
        os.pwrite(self._fd, holder.encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock(workdir: str) -> WorkdirLock:
    return WorkdirLock(workdir)


def write_atomic(path: str, text: str) -> None:
    """Replaces `path` by `text` in one rename (write-then-rename, fsynced)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside `path` (same extension) to write to, e.g. with
    `savefig`; renames it over `path` when the block succeeds, removes it otherwise."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    root, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{root}.", suffix=f".tmp{ext}")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parse(path: str) -> tuple[list[dict], int]:
    """Records and the byte length of the intact prefix (a torn last line excluded)."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else an unterminated line
    if tail.strip():
        lines.append(tail)
    records, good = [], 0
    for number, raw in enumerate(lines, start=1):
        if raw.strip():
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if number < len(lines):
                    raise CorruptFileError(f"{path} line {number}: not a JSON object ({e})") from e
                log.warning("%s line %d is torn (%s); dropping it", path, number, e)
                return records, good
            records.append(record)
        good = min(good + len(raw) + 1, len(data))
    return records, good


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file ([] if absent); a torn last line is dropped."""
    if not os.path.exists(path):
        return []
    return _parse(path)[0]


def repair_jsonl(path: str) -> None:
    """Cuts a torn last line off `path` and ends the last line, so appends start clean."""
    if not os.path.exists(path):
        return
    _, good = _parse(path)
    size = os.path.getsize(path)
    if good < size:
        os.truncate(path, good)
    if good:
        with open(path, "rb+") as f:
            f.seek(good - 1)
            if f.read(1) != b"\n":
                f.write(b"\n")


def append_jsonl(path: str, record: Mapping) -> None:
    """Appends one record as one line, flushed and fsynced."""
    line = json.dumps(dict(record)) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def rewrite_jsonl(path: str, records: Iterable[Mapping]) -> None:
    """Replaces `path` atomically by `records`."""
    write_atomic(path, "".join(json.dumps(dict(r)) + "\n" for r in records))
