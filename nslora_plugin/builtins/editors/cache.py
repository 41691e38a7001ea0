"""A reply cache for editor calls, under the run's artifacts folder (`<run>/nslora/editor_cache/`).

The key is a SHA-256 of everything that changes an answer: backend, endpoint, model, the full
messages, temperature and max_tokens (never the API key). One small JSON file per entry, written
atomically, so concurrent calls and a killed run cannot corrupt it. Only successful, non-empty
replies are stored, and the editor drops a reply again when it turns out unusable (no tags,
chat-template tokens, over-long), so a flaky server's bad reply is not replayed. `editor_cache: false` turns it off; the folder is not copied into checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_key(**fields: Any) -> str:
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ReplyCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        text = data.get("text") if isinstance(data, dict) else None
        return text if isinstance(text, str) and text else None

    def put(self, key: str, text: str, meta: dict[str, Any] | None = None) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"text": text, **(meta or {})}, fh, ensure_ascii=False)
            os.replace(tmp, path)
        except OSError:  # a full disk must not stop the editor
            pass

    def forget(self, key: str) -> None:
        """Drop an entry (a reply that turned out unusable must not be replayed)."""
        try:
            self._path(key).unlink()
        except OSError:
            pass

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.is_dir() else 0
