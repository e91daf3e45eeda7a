"""Write-behind for ledger stores: ``record()`` queues a row, a background thread writes the
queue in one batch at most ``write_behind_s`` later.

Shared by the SQLite and Redis stores. A store subclasses ``WriteBehind``, calls
``_start_write_behind()`` from its constructor and implements ``_commit(rows)`` (write a
batch, or raise ``StoreUnavailable``: the rows then stay queued and are retried). Reads,
``flush()``, ``close()``, interpreter exit and multiprocessing worker exit write the queue
first, so a process always reads its own rows; a process killed with SIGKILL loses at most
the last window. After ``fork`` the child starts with an empty queue: rows queued in the
parent are the parent's to write.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import threading
import time
import weakref
from typing import Final

from .._errors import ConfigurationError, StoreUnavailable
from .._ledger import LedgerRow

__all__ = ["WriteBehind"]

log = logging.getLogger("tokenguard")
_MAX_QUEUE: Final = 2000  # past this many queued rows, record() writes them itself


class WriteBehind:
    """The queue, the writer thread and the exit hooks of a write-behind store."""

    url: str
    write_behind_s: float
    _queue: list[LedgerRow]
    _cond: threading.Condition
    _flush_lock: threading.Lock
    _writer: threading.Thread | None
    _closed: bool
    _queue_pid: int

    def _start_write_behind(self, write_behind_s: float) -> None:
        if (
            isinstance(write_behind_s, bool)
            or not isinstance(write_behind_s, int | float)
            or not (0 <= write_behind_s <= 60)
        ):
            raise ConfigurationError("write_behind_s", write_behind_s, "must be between 0 and 60 seconds")
        self.write_behind_s = float(write_behind_s)
        # one list object for the store's life (mutated in place), so a finalizer can write
        # what a store dropped without close() still had queued
        self._queue = []
        self._reset_write_behind()
        _stores.add(self)

    def _reset_write_behind(self) -> None:
        self._flush_lock = threading.Lock()  # one batch at a time
        self._cond = threading.Condition()  # guards the queue
        self._queue.clear()
        self._writer = None
        self._closed = False
        self._queue_pid = os.getpid()

    def _after_fork(self) -> None:
        """In a forked child: a fresh queue (stores add their own connection resets)."""
        self._reset_write_behind()

    def _commit(self, rows: list[LedgerRow]) -> None:
        """Write ``rows`` in one batch (raise ``StoreUnavailable`` on failure)."""
        raise NotImplementedError

    def record(self, row: LedgerRow) -> None:
        """Queue one row for the writer thread (or write it now when ``write_behind_s=0``)."""
        if self.write_behind_s <= 0:
            self._commit([row])
            return
        with self._cond:
            self._queue.append(row)
            backlog = len(self._queue)
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(
                    target=_writer_loop, args=(weakref.ref(self),), name="tokenguard-ledger-writer", daemon=True
                )
                self._writer.start()
            if backlog == 1:
                self._cond.notify()
        if backlog >= _MAX_QUEUE:
            self.flush()

    def flush(self) -> None:
        """Write every queued row now (raises ``StoreUnavailable`` if that fails; the rows stay queued)."""
        with self._flush_lock:
            with self._cond:
                batch = self._queue[:]
                self._queue.clear()
            if not batch:
                return
            try:
                self._commit(batch)
            except BaseException:
                with self._cond:
                    self._queue[:0] = batch
                raise

    @property
    def queued(self) -> int:
        """Rows recorded but not yet written."""
        return len(self._queue)

    def _stop_writer(self) -> None:
        """Write what is queued, then let the writer thread end (``close()`` calls this first)."""
        try:
            self.flush()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()


def _writer_loop(ref: weakref.ref[WriteBehind]) -> None:
    """Write queued rows in batches until the store is closed or collected.

    Holds the store only while flushing, so a store dropped without ``close()`` can be
    collected (its finalizer, if it has one, then writes what was still queued).
    """
    store = ref()
    if store is None:
        return
    cond, queue, delay = store._cond, store._queue, store.write_behind_s
    del store
    while True:
        with cond:
            while not queue:
                cond.wait(1.0)
                alive = ref()
                if alive is None or alive._closed:
                    return
                del alive
        time.sleep(delay)  # let rows gather into one batch
        store = ref()
        if store is None:
            return
        try:
            store.flush()
        except StoreUnavailable as err:
            log.error("tokenguard: ledger write failed; rows stay queued and are retried: %s", err)
            time.sleep(1.0)
        del store


_stores: weakref.WeakSet[WriteBehind] = weakref.WeakSet()
_flushed_at_exit = -1  # the pid whose exit flush has run (atexit and multiprocessing both call it)


def _flush_all() -> None:
    """Write every store's queue (at exit), once per process."""
    global _flushed_at_exit
    if _flushed_at_exit == os.getpid():
        return
    _flushed_at_exit = os.getpid()
    for store in list(_stores):
        if store._queue_pid != os.getpid():
            continue
        try:
            store.flush()
        except Exception as err:  # exit must go on
            log.error("tokenguard: %d ledger row(s) could not be written at exit: %s", store.queued, err)


class _ExitHook:
    """Registers ``_flush_all`` with multiprocessing, whose workers leave through ``os._exit``
    (skipping atexit) but run its finalizers; a forked worker re-registers after its fork."""

    def register(self) -> None:
        multiprocessing.util.Finalize(None, _flush_all, exitpriority=10)
        multiprocessing.util.register_after_fork(self, _ExitHook.register)


_exit_hook = _ExitHook()
_exit_hook.register()
atexit.register(_flush_all)


def _after_fork_in_child() -> None:
    for store in list(_stores):
        store._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
