"""Which trainer annotation ids the backend submitted for which Label Studio annotation, and which
annotations it could not submit.

Label Studio's delete webhook carries only the annotation's id, and an update carries only the
new version; to withdraw the earlier versions the backend must remember the keys it submitted.
Label Studio saves an annotation whatever the webhook answers, so the backend also remembers the
ones it rejected (with the error), until a later version of the same annotation is stored or the
annotation is deleted: GET /health lists them. A small SQLite file (so a restarted backend still
knows both); ":memory:" keeps it in memory.
"""

from __future__ import annotations

import json
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
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS rejected ("
            " annotation TEXT PRIMARY KEY,"  # Label Studio annotation id (its latest version counts)
            " task TEXT NOT NULL,"  # Label Studio task id
            " project TEXT NOT NULL,"  # Label Studio project id ("" when the webhook named none)
            " error TEXT NOT NULL,"  # why nothing was stored, as the webhook answered it
            " region TEXT,"  # JSON of the region the error is about, or NULL
            " rejected_at REAL NOT NULL,"  # unix seconds
            " shown TEXT NOT NULL DEFAULT '')"  # where Label Studio shows it ("" not yet, or why not)
        )

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

    def reject(self, annotation: object, task: object, project: object, error: str, region: dict | None) -> None:
        """Records (or replaces) the rejection of an annotation's latest version."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO rejected (annotation, task, project, error, region, rejected_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (str(annotation), str(task), str(project or ""), error,
                 None if region is None else json.dumps(region, ensure_ascii=False), time.time()),
            )

    def unreject(self, annotation: object) -> str | None:
        """Forgets an annotation's rejection (a later version was stored, or it was deleted);
        returns the task it was on, None when it had none."""
        with self._lock:
            row = self._db.execute("SELECT task FROM rejected WHERE annotation = ?", (str(annotation),)).fetchone()
            self._db.execute("DELETE FROM rejected WHERE annotation = ?", (str(annotation),))
        return None if row is None else row[0]

    def mark_shown(self, annotation: object, shown: str) -> None:
        with self._lock:
            self._db.execute("UPDATE rejected SET shown = ? WHERE annotation = ?", (shown, str(annotation)))

    def rejected(self, task: object | None = None, limit: int = 100) -> list[dict]:
        """The rejected annotations (of one task, or all), newest first."""
        query = "SELECT annotation, task, project, error, region, rejected_at, shown FROM rejected"
        args: tuple = ()
        if task is not None:
            query, args = query + " WHERE task = ?", (str(task),)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY rejected_at DESC LIMIT ?", (*args, limit)).fetchall()
        return [{"annotation": a, "task": t, "project": p, "error": e, "region": None if r is None else json.loads(r),
                 "rejected_at": at, "shown": s} for a, t, p, e, r, at, s in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
