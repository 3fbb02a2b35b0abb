"""The durable response cache: every response the teacher endpoint returned, one file per cache key.

It lives outside DVC outputs (`teacher.cache_dir`, default .cache/teacher), so `dvc repro` never
wipes it: a re-run with the same inputs makes no calls, and a stage killed halfway pays again only
for the responses it never received. Malformed answers are cached too; they were paid for, and a
re-run must reach the same verdict on them.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from iga.io import atomic_write_text

log = logging.getLogger(__name__)


def cache_key(body: dict[str, Any], prompt_version: str, attempt: int, tries: int) -> str:
    """sha256 of the request (model, messages, sampling params) with the prompt version, the gate's
    attempt and the try within it; the API key and the endpoint URL are deliberately not part of it."""
    payload = {"body": body, "prompt_version": prompt_version, "attempt": attempt, "try": tries}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ResponseCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # only a power loss can leave a damaged entry (no fsync)
            log.warning("ignoring a damaged response cache entry %s (%s): the call will be made again", path, e)
            return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Written atomically but not fsynced: a killed process loses nothing it had received."""
        atomic_write_text(self.path(key), json.dumps(entry, ensure_ascii=False), fsync=False)
