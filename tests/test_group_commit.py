"""Group commit: concurrent changes share one flush, and nobody returns before a flush covered theirs."""

from __future__ import annotations

import threading
import time

import pytest

from firebreak.broker.group_commit import GroupCommit


class Store:
    """Changes in memory under a lock; a flush copies what is there and takes a while to write it."""

    def __init__(self, fail_first: int = 0) -> None:
        self.lock = threading.Lock()
        self.changes = 0
        self.on_disk = 0
        self.flushes = 0
        self.fail_first = fail_first
        self.commit = GroupCommit(self.flush)

    def flush(self) -> int:
        with self.lock:
            covered = self.changes
        time.sleep(0.01)  # the write
        self.flushes += 1
        if self.flushes <= self.fail_first:
            raise OSError("disk full")
        self.on_disk = covered
        return covered

    def change(self) -> int:
        with self.lock:
            self.changes += 1
            return self.changes


def test_concurrent_changes_share_flushes_and_each_returns_after_its_own_is_written() -> None:
    store = Store()
    seen: list[tuple[int, int]] = []  # (ticket, on disk when wait returned)
    barrier = threading.Barrier(40)

    def request() -> None:
        barrier.wait()
        ticket = store.change()
        store.commit.wait(ticket)
        seen.append((ticket, store.on_disk))

    threads = [threading.Thread(target=request) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(t for t, _ in seen) == list(range(1, 41))
    assert all(on_disk >= ticket for ticket, on_disk in seen)
    assert store.flushes < 40, f"{store.flushes} flushes for 40 changes: nothing was grouped"
    assert store.commit.durable == 40


def test_a_change_already_written_does_not_flush_again() -> None:
    store = Store()
    store.commit.wait(store.change())
    store.commit.wait(1)
    assert store.flushes == 1


def test_a_failed_flush_raises_in_its_leader_and_the_next_waiter_writes_it() -> None:
    store = Store(fail_first=1)
    ticket = store.change()
    with pytest.raises(OSError, match="disk full"):
        store.commit.wait(ticket)
    assert store.commit.durable == 0 and store.on_disk == 0
    store.commit.wait(ticket)
    assert store.on_disk == 1 and store.flushes == 2
