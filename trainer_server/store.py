"""The annotation store: SQLite in WAL mode under --data, one row per annotated sequence.

Durability is the contract: `insert` returns only after the transaction holding its annotations
is committed, and with synchronous=FULL (the default) a commit is on disk when it returns, so an
ACCEPTED annotation survives a crash or SIGKILL the next instant. Concurrent inserts share that
transaction (group commit, as databases do): while one commit is being written and fsync'd, the
inserts that arrive queue up, and the next of them to get the connection commits all queued ones
in one transaction and one fsync; each call still returns only after the commit that holds it.
Reads that must not wait behind a commit (`existing`, `get`, `counts`) use a second connection,
which in WAL mode sees every committed transaction. An annotation_id is the idempotency key: inserting
it again changes nothing and reports it as a duplicate.

States: pending (stored, never trained on) -> consumed (trained on at least once) -> withdrawn
(never trained on again; also reachable from pending). Quarantined: found untrainable when a batch
was made (rows.BatchRules.batch, e.g. weights stored before the submit bounds existed); kept with
its reason, never trained on, training goes on with the rest (docs/design.md, "Errors and limits"). `consumed_step` records the optimizer step
that first trained on an annotation, so that resuming from a checkpoint taken at step S can put
back to pending everything first consumed after S: the weights on disk never saw those.

Writes go through one connection guarded by a lock; the engine calls the store from worker
threads (never from the event loop).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from trainer_server.rows import Annotation, Row

PENDING, CONSUMED, WITHDRAWN, QUARANTINED = 1, 2, 3, 4  # the proto's AnnotationState numbers
STATE_NAMES = {PENDING: "pending", CONSUMED: "consumed", WITHDRAWN: "withdrawn", QUARANTINED: "quarantined"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS annotations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order
    annotation_id TEXT NOT NULL UNIQUE,      -- the client's idempotency key
    state INTEGER NOT NULL,                  -- 1 pending, 2 consumed, 3 withdrawn, 4 quarantined
    model_version INTEGER NOT NULL,          -- the policy version that produced the completion
    prompt_ids BLOB NOT NULL,                -- int32 little-endian
    completion_ids BLOB NOT NULL,            -- int32 little-endian
    behavior_logprobs BLOB,                  -- float32 little-endian, one per completion token, or NULL
    rows TEXT NOT NULL,                      -- JSON [[position, token_id, weight, replacement], ...]
    n_rows INTEGER NOT NULL,
    sequence_reward REAL,
    annotator_id TEXT NOT NULL,
    metadata TEXT NOT NULL,                  -- JSON object of strings
    stored_at REAL NOT NULL,                 -- Unix seconds
    consumed_step INTEGER,                   -- the optimizer step that first trained on it
    quarantine_reason TEXT                   -- why it cannot be trained on (state 4)
);
CREATE INDEX IF NOT EXISTS annotations_state ON annotations(state, seq);
"""


def insert_sql() -> str:
    """The statement that stores one annotation (row_values gives its parameters)."""
    return ("INSERT OR IGNORE INTO annotations (annotation_id, state, model_version, prompt_ids, completion_ids, "
            "behavior_logprobs, rows, n_rows, sequence_reward, annotator_id, metadata, stored_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def row_values(a: Annotation, now: float) -> tuple:
    """One annotation as insert_sql's parameters: ids as int32 and logprobs as float32 blobs, rows
    and metadata as JSON."""
    return (
        a.annotation_id,
        PENDING,
        a.model_version,
        array("i", a.prompt_ids).tobytes(),
        array("i", a.completion_ids).tobytes(),
        None if a.behavior_logprobs is None else array("f", a.behavior_logprobs).tobytes(),
        json.dumps([[r.position, r.token_id, r.weight, r.replacement] for r in a.rows]),
        len(a.rows),
        a.sequence_reward,
        a.annotator_id,
        json.dumps(a.metadata, sort_keys=True),
        now,
    )


@dataclass
class _Write:
    """One insert() call waiting for the transaction that commits it."""

    annotations: list[Annotation]
    stored: list[bool] | None = None
    error: BaseException | None = None
    done: bool = False  # set by the committer once its transaction is over


@dataclass(frozen=True)
class StoredAnnotation:
    seq: int
    annotation: Annotation
    state: int
    stored_at: float
    consumed_step: int | None
    quarantine_reason: str = ""


def _ints(blob: bytes) -> tuple[int, ...]:
    values = array("i")
    values.frombytes(blob)
    return tuple(values)


def _floats(blob: bytes | None) -> tuple[float, ...] | None:
    if blob is None:
        return None
    values = array("f")
    values.frombytes(blob)
    return tuple(values)


class AnnotationStore:
    """SQLite-backed store of annotations; thread-safe: a writing connection and a reading one."""

    def __init__(self, path: Path, sync: str = "full"):
        assert sync in ("full", "normal"), f"sync must be full or normal, got {sync!r}"
        assert array("i").itemsize == 4 and array("f").itemsize == 4, "int32/float32 arrays expected"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()  # the writing connection, and one transaction at a time
        self._queue_lock = threading.Lock()
        self._queue: list[_Write] = []  # inserts waiting for the next group commit
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={sync.upper()}")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(annotations)")}
        if "quarantine_reason" not in columns:  # a store written before quarantine existed
            self._db.execute("ALTER TABLE annotations ADD COLUMN quarantine_reason TEXT")
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._reader.execute("PRAGMA busy_timeout=10000")

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()

    # ---- writes ----

    def insert(self, annotations: list[Annotation]) -> list[bool]:
        """Store the annotations; per annotation True when stored, False when its id was stored
        before (or earlier in the same list, or by a concurrent call committed first). Returns
        only after the transaction that holds them is committed (group commit, module docstring);
        an error in these annotations leaves the others of the group committed."""
        write = _Write(annotations)
        with self._queue_lock:
            self._queue.append(write)
        with self._lock:  # one transaction at a time; whoever gets here first commits everyone queued
            if not write.done:
                with self._queue_lock:
                    group, self._queue = self._queue, []
                self._commit(group)
        if write.error is not None:
            raise write.error
        return write.stored

    def _commit(self, group: list[_Write]) -> None:
        """One transaction (one fsync with synchronous=FULL) for every queued write, each inside
        its own savepoint so that one write's failure rolls back only that write."""
        now = time.time()
        sql = insert_sql()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for i, write in enumerate(group):
                    self._db.execute(f"SAVEPOINT w{i}")
                    try:
                        write.stored = [self._db.execute(sql, row_values(a, now)).rowcount == 1
                                        for a in write.annotations]
                    except Exception as exc:  # noqa: BLE001 - this write fails, the group goes on
                        self._db.execute(f"ROLLBACK TO w{i}")
                        write.error, write.stored = exc, None
                    self._db.execute(f"RELEASE w{i}")
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except BaseException as exc:  # nothing of the group is stored: every write fails with it
            for write in group:
                write.error, write.stored = write.error or exc, None
            if not isinstance(exc, Exception):
                raise
        finally:
            for write in group:
                write.done = True

    def withdraw(self, annotation_ids: list[str]) -> tuple[int, list[str]]:
        """Mark annotations withdrawn. Returns (newly withdrawn, ids never stored)."""
        withdrawn, unknown = 0, []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for annotation_id in annotation_ids:
                    row = self._db.execute(
                        "SELECT state FROM annotations WHERE annotation_id = ?", (annotation_id,)
                    ).fetchone()
                    if row is None:
                        unknown.append(annotation_id)
                    elif row[0] != WITHDRAWN:
                        self._db.execute(
                            "UPDATE annotations SET state = ? WHERE annotation_id = ?", (WITHDRAWN, annotation_id)
                        )
                        withdrawn += 1
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return withdrawn, unknown

    def mark_consumed(self, seqs: list[int], step: int) -> None:
        """Pending -> consumed for these annotations, first consumed at `step`."""
        if not seqs:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE annotations SET state = ?, consumed_step = ? WHERE seq = ? AND state = ?",
                    [(CONSUMED, step, seq, PENDING) for seq in seqs],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def quarantine(self, seqs_reasons: list[tuple[int, str]]) -> None:
        """Pending or consumed -> quarantined, each with the reason it cannot be trained on."""
        if not seqs_reasons:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE annotations SET state = ?, quarantine_reason = ? WHERE seq = ? AND state IN (?, ?)",
                    [(QUARANTINED, reason, seq, PENDING, CONSUMED) for seq, reason in seqs_reasons],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def restore_consumed(self, step: int) -> int:
        """Resume at a checkpoint taken after `step` optimizer steps: annotations first consumed
        after it go back to pending (the weights on disk never trained on them). Returns how many."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE annotations SET state = ?, consumed_step = NULL WHERE state = ? AND consumed_step > ?",
                (PENDING, CONSUMED, step),
            )
            return cursor.rowcount

    # ---- reads ----

    def get(self, annotation_id: str) -> StoredAnnotation | None:
        with self._read_lock:
            row = self._reader.execute(f"SELECT {_COLUMNS} FROM annotations WHERE annotation_id = ?",
                                   (annotation_id,)).fetchone()
        return None if row is None else _decode(row)

    def existing(self, annotation_ids: list[str]) -> set[str]:
        """Which of these ids are stored already."""
        found: set[str] = set()
        with self._read_lock:
            for start in range(0, len(annotation_ids), 500):
                part = annotation_ids[start : start + 500]
                marks = ",".join("?" * len(part))
                found.update(r[0] for r in self._reader.execute(
                    f"SELECT annotation_id FROM annotations WHERE annotation_id IN ({marks})", part))
        return found

    def pending(self, limit: int, after_seq: int = 0) -> list[StoredAnnotation]:
        """The oldest pending annotations that arrived after `after_seq`."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM annotations WHERE state = ? AND seq > ? ORDER BY seq LIMIT ?",
                (PENDING, after_seq, limit),
            ).fetchall()
        return [_decode(r) for r in rows]

    def replay(self, after_seq: int, limit: int) -> list[StoredAnnotation]:
        """Pending and consumed annotations after `after_seq`, in arrival order (cycling over old
        data once nothing is pending)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM annotations WHERE seq > ? AND state IN (?, ?) ORDER BY seq LIMIT ?",
                (after_seq, PENDING, CONSUMED, limit),
            ).fetchall()
        return [_decode(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Annotations by state, their total, and the rows of the trainable (pending, consumed) ones."""
        with self._lock:
            by_state = dict(self._db.execute("SELECT state, COUNT(*) FROM annotations GROUP BY state").fetchall())
            rows = self._db.execute(
                "SELECT COALESCE(SUM(n_rows), 0) FROM annotations WHERE state IN (?, ?)", (PENDING, CONSUMED)
            ).fetchone()[0]
        counts = {name: by_state.get(state, 0) for state, name in STATE_NAMES.items()}
        counts["total"] = sum(by_state.values())
        counts["rows"] = rows
        return counts


_COLUMNS = ("seq, annotation_id, state, model_version, prompt_ids, completion_ids, behavior_logprobs, rows, "
            "sequence_reward, annotator_id, metadata, stored_at, consumed_step, quarantine_reason")


def _decode(row: tuple) -> StoredAnnotation:
    (seq, annotation_id, state, model_version, prompt, completion, behavior, rows, sequence_reward,
     annotator_id, metadata, stored_at, consumed_step, quarantine_reason) = row
    annotation = Annotation(
        annotation_id=annotation_id,
        prompt_ids=_ints(prompt),
        completion_ids=_ints(completion),
        model_version=model_version,
        rows=tuple(Row(int(p), int(t), float(w), bool(r)) for p, t, w, r in json.loads(rows)),
        behavior_logprobs=_floats(behavior),
        sequence_reward=sequence_reward,
        annotator_id=annotator_id,
        metadata=json.loads(metadata),
    )
    return StoredAnnotation(seq, annotation, state, stored_at, consumed_step, quarantine_reason or "")
