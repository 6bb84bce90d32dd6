"""The store's group commit: concurrent inserts share one transaction (one fsync), each call returns
only after that commit, duplicates across concurrent calls are found, and one call's failure
leaves the others of its group stored."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from trainer_server.rows import Annotation, Row
from trainer_server.store import AnnotationStore


def annotation(annotation_id: str, **fields) -> Annotation:
    return Annotation(annotation_id, (1, 2), (3, 4, 5), 0, (Row(1, 4, -1.0),), **fields)


def run_queued(store: AnnotationStore, calls: list[list[Annotation]], monkeypatch) -> tuple[list, list[int]]:
    """Start one thread per call while a commit is held up, so they all queue; returns each call's
    result (or exception) and the size of every transaction committed."""
    groups = []
    commit = store._commit

    def counting(group):
        groups.append(sum(len(w.annotations) for w in group))
        commit(group)

    monkeypatch.setattr(store, "_commit", counting)
    results: list = [None] * len(calls)

    def call(i: int) -> None:
        try:
            results[i] = store.insert(calls[i])
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    with store._lock:  # the commit in progress: every call queues behind it
        for t in threads:
            t.start()
        while True:
            with store._queue_lock:
                if len(store._queue) == len(calls):
                    break
    for t in threads:
        t.join(timeout=60)
    return results, groups


def test_concurrent_inserts_share_one_commit_and_all_are_on_disk(tmp_path, monkeypatch):
    store = AnnotationStore(tmp_path / "a.sqlite")
    results, groups = run_queued(store, [[annotation(f"a{i}")] for i in range(8)], monkeypatch)
    assert results == [[True]] * 8
    assert groups == [8], f"expected one transaction for the 8 waiting inserts, got {groups}"
    store.close()
    db = sqlite3.connect(tmp_path / "a.sqlite")
    assert db.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == 8


def test_a_duplicate_across_concurrent_calls_is_stored_once(tmp_path, monkeypatch):
    store = AnnotationStore(tmp_path / "a.sqlite")
    results, _ = run_queued(store, [[annotation("same")], [annotation("same")], [annotation("other")]], monkeypatch)
    assert sorted(r[0] for r in results[:2]) == [False, True] and results[2] == [True]
    assert store.counts()["total"] == 2


def test_one_failing_call_leaves_the_rest_of_its_group_stored(tmp_path, monkeypatch):
    store = AnnotationStore(tmp_path / "a.sqlite")
    bad = annotation("bad", metadata={"k": object()})  # cannot be written (not JSON)
    results, groups = run_queued(store, [[annotation("g1")], [annotation("x"), bad], [annotation("g2")]], monkeypatch)
    assert groups == [4]
    assert results[0] == [True] and results[2] == [True]
    assert isinstance(results[1], TypeError)
    assert store.get("x") is None, "a failing call stored part of itself"
    assert store.get("g1") is not None and store.get("g2") is not None


def test_an_insert_alone_commits_at_once(tmp_path):
    store = AnnotationStore(tmp_path / "a.sqlite")
    assert store.insert([annotation("a"), annotation("a")]) == [True, False]
    assert store.existing(["a", "b"]) == {"a"}
    with pytest.raises(TypeError):
        store.insert([annotation("c", metadata={"k": object()})])
    assert store.counts()["total"] == 1
