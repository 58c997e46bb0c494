"""Files in a run's workdir that survive a kill at any moment, and one writer per workdir.

- `lock(workdir)`: an exclusive `fcntl` lock on `DIR/.lock` held for the life of the process;
  a second process exits with `WorkdirLockedError` naming the holder. The kernel drops the
  lock when its holder dies (kill -9 included), so a stale lock never blocks the next run.
- `write_atomic(path, text)`: write a temporary file beside `path`, fsync, rename over it.
  A reader sees the old content or the new one, never a mix or an empty file.
  `atomic_path(path)` does the same for writers that want a file name (plots).
  Both create files with the usual mode under the process umask (0666 & ~umask).
- `read_jsonl(path)` / `append_jsonl(path, record)`: append-only JSON lines. A torn last line
  (a kill mid-append) is reported with its file and line number and dropped; `append_jsonl`
  cuts it off (`repair_jsonl`) before appending. A bad line elsewhere raises `CorruptFileError`.
- `dumps_json(value)`: strict JSON; a NaN or inf is written as null, never as bare `NaN`.
- `check_workdir(path)`: a clear `WorkdirError` for a workdir that cannot be one (empty, a
  file, under a file, unwritable), before any work; `make_workdir(path)` also creates it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Iterable, Mapping

import numpy as np

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir."""


class CorruptFileError(ValueError):
    """A workdir file holds a line that is not JSON (not a torn last line)."""


class WorkdirError(ValueError):
    """A workdir path that cannot hold a run (the message names the path and why)."""


def check_workdir(path: str) -> str:
    """`path` as an absolute path if it is, or can become, a writable folder; raises
    WorkdirError otherwise. Creates nothing."""
    if not isinstance(path, str) or not path.strip():
        raise WorkdirError(f"workdir: must be a folder path, got {path!r}")
    full = os.path.abspath(os.path.expanduser(path))
    if "[" in full or "]" in full:  # orbax globs in checkpoint folders: "[1]" breaks its saves
        raise WorkdirError(
            f"workdir {path}: '[' and ']' are not allowed in its path (the checkpoint library "
            "reads them as a glob pattern and its saves would not restore)"
        )
    existing = full
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is" if existing == full else f"is under {existing}, which is"
        raise WorkdirError(f"workdir {path}: {where} a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {path}: {existing} is not writable")
    return full


def make_workdir(path: str) -> str:
    """`check_workdir(path)`, then creates the folder; WorkdirError if that fails."""
    full = check_workdir(path)
    try:
        os.makedirs(full, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"workdir {path}: cannot create it ({e.strerror})") from e
    return full


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


def _create_temp(directory: str, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file `directory/prefix<random>suffix` opened for writing; unlike `mkstemp` (mode
    0600) its mode is 0666 less the umask, as for any other file the project writes."""
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {directory}")


def write_atomic(path: str, text: str) -> None:
    """Replaces `path` by `text` in one rename (write-then-rename, fsynced)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp(directory, f".{os.path.basename(path)}.", ".tmp")
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
    fd, tmp = _create_temp(directory, f".{root}.", f".tmp{ext}")
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


def _finite_or_none(value):
    """`value` with every NaN/inf float (Python or NumPy) replaced by None."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def dumps_json(value, **kwargs) -> str:
    """`json.dumps` that writes NaN/inf as null (bare `NaN` is not JSON)."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)


def append_jsonl(path: str, record: Mapping) -> None:
    """Appends one record as one line (NaN/inf as null), flushed and fsynced. A torn last line
    (a kill mid-append) is cut off first, so the new record never joins it."""
    line = dumps_json(dict(record)) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if _unterminated(path):
        repair_jsonl(path)
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _unterminated(path: str) -> bool:
    """Whether `path` exists and its last byte is not a newline (one byte read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def rewrite_jsonl(path: str, records: Iterable[Mapping]) -> None:
    """Replaces `path` atomically by `records` (NaN/inf as null)."""
    write_atomic(path, "".join(dumps_json(dict(r)) + "\n" for r in records))
