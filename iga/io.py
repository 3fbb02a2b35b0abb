"""JSONL/JSON I/O: atomic writes, and reads whose errors name file and line."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from iga.errors import Busy, DataError

TMP_SUFFIX = ".tmp"  # atomic writes go through `.<name>.<random>.tmp` siblings
# mkstemp/mkdtemp create private (0600/0700) files; published outputs get what open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_file(path: str | Path, fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file to fill, written via a temporary sibling and renamed on success: readers (and a
    process killed mid-write) never see half a file. `fsync=False` keeps that guarantee against a
    killed process but not against a power loss, for ~20x cheaper writes (0.03 vs 0.63 ms here)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> None:
    with atomic_file(path, fsync) as f:
        f.write(text.encode("utf-8"))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `path` (a model, an adapter)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def leftover_temporaries(root: str | Path) -> list[Path]:
    """The temporary siblings that atomic writes killed mid-way left under `root` (files or folders)."""
    return sorted(Path(root).rglob(f".*{TMP_SUFFIX}")) if Path(root).is_dir() else []


@contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` for `what`, or raise Busy at once naming the holder. An OS file
    lock (flock): released when its holder exits or is killed, so no stale lock survives a kill -9."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise Busy(f"{what} is already in progress here ({holder}; lock {path}): this one stops. "
                       f"Run it again when that one has finished") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read one JSON object per non-blank line; errors say `file:line: what`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows
