"""Watching a response body that the caller reads later (streams and streamed raw responses).

``install_tap`` swaps an ``httpx2.Response``'s byte stream for a pass-through that keeps
a copy of every chunk and calls ``finish(body, error)`` exactly once: when the
stream is read to its end, closed early, broken by an error, or — if the caller simply
drops it — garbage-collected (or the interpreter exits). So an abandoned stream is still
charged. Nothing the caller reads is changed, delayed or reordered.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator

import httpx2

__all__ = ["install_tap"]

# raised when a body is read a second time, which SDK clean-up code does on purpose
_REUSE = (httpx2.StreamConsumed, httpx2.StreamClosed)

Finish = Callable[[bytes, "str | None"], None]


class _Tap:
    """The state a tee and its finalizer share (the finalizer must not hold the tee itself)."""

    __slots__ = ("_done", "_finish", "_lock", "chunks", "complete", "error")

    def __init__(self, finish: Finish) -> None:
        self.chunks: list[bytes] = []
        self.complete = False
        self.error: str | None = None
        self._finish = finish
        self._done = False
        self._lock = threading.Lock()

    def finish(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._finish(b"".join(self.chunks), self.error)


class _SyncTee(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, tap: _Tap) -> None:
        self._inner = inner
        self._tap = tap

    def __iter__(self) -> Iterator[bytes]:
        tap = self._tap
        try:
            for chunk in self._inner:
                tap.chunks.append(chunk)
                yield chunk
            tap.complete = True
        except _REUSE:
            raise  # a second read (the SDK drains a finished stream): not a failure of the body
        except Exception as exc:
            tap.error = type(exc).__name__
            raise
        finally:
            if tap.complete or tap.error:
                tap.finish()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._tap.finish()


class _AsyncTee(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, tap: _Tap) -> None:
        self._inner = inner
        self._tap = tap

    async def __aiter__(self) -> AsyncIterator[bytes]:
        tap = self._tap
        try:
            async for chunk in self._inner:
                tap.chunks.append(chunk)
                yield chunk
            tap.complete = True
        except _REUSE:
            raise  # a second read (the SDK drains a finished stream): not a failure of the body
        except Exception as exc:
            tap.error = type(exc).__name__
            raise
        finally:
            if tap.complete or tap.error:
                tap.finish()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._tap.finish()


def install_tap(response: httpx2.Response, finish: Finish, *, is_async: bool) -> None:
    """Route ``response``'s body through a tee that reports the whole body once it ends."""
    tap = _Tap(finish)
    stream = response.stream
    tee: httpx2.SyncByteStream | httpx2.AsyncByteStream = (
        _AsyncTee(stream, tap) if is_async else _SyncTee(stream, tap)  # type: ignore[arg-type]
    )
    response.stream = tee
    # dropped without being read or closed: charge what was received when it is collected
    weakref.finalize(tee, tap.finish)
