"""Which trainer annotation ids the backend submitted for which Label Studio annotation.

Label Studio's delete webhook carries only the annotation's id, and an update carries only the
new version; to withdraw the earlier versions the backend must remember the keys it submitted.
A small SQLite file (so a restarted backend still withdraws what it submitted before); ":memory:"
keeps it in memory.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path


class SubmissionLog:
    """(Label Studio annotation id -> trainer annotation ids) with their withdrawn flag."""

    def __init__(self, path: str | Path):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # autocommit, one statement per change; used from the backend's worker threads, one at a time
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS submitted ("
            " key TEXT PRIMARY KEY,"  # the trainer's annotation_id (the idempotency key)
            " annotation TEXT NOT NULL,"  # Label Studio annotation id
            " task TEXT NOT NULL,"  # Label Studio task id
            " submitted_at REAL NOT NULL,"  # unix seconds
            " withdrawn INTEGER NOT NULL DEFAULT 0)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS by_annotation ON submitted (annotation)")

    def add(self, key: str, annotation: object, task: object) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO submitted (key, annotation, task, submitted_at) VALUES (?, ?, ?, ?)",
                (key, str(annotation), str(task), time.time()),
            )

    def active(self, annotation: object) -> list[str]:
        """Keys of this annotation that are not withdrawn, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key FROM submitted WHERE annotation = ? AND withdrawn = 0 ORDER BY submitted_at, key",
                (str(annotation),),
            ).fetchall()
        return [key for (key,) in rows]

    def mark_withdrawn(self, keys: list[str]) -> None:
        with self._lock:
            self._db.executemany("UPDATE submitted SET withdrawn = 1 WHERE key = ?", [(key,) for key in keys])

    def close(self) -> None:
        with self._lock:
            self._db.close()
