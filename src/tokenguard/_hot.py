"""The hot path: a repeat of a cached call is answered before the SDK builds the request.

A cache hit through the ``request()`` seam still pays for the SDK turning the arguments
into a request body (its ``maybe_transform``: ~40% of a bare call) and for parsing the
stored response again (~20%). For the plain ``create`` methods (chat completions,
responses, completions, embeddings, messages) a guarded client also remembers, per exact
set of arguments, the cache key and the parsed answer of its last hit; a repeat then
checks that the stored entry is still the very one the answer came from and returns a deep
copy of it. Everything else — streams, raw responses, arguments that are not plain JSON,
``cache_control()`` blocks, the first hit — takes the ordinary path, so this is an
optimisation only: it answers exactly what the ordinary path would, with the same ledger
row.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import pydantic

from ._cache import Cache, CacheEntry, cache_control_active, deterministic
from ._pipeline import Call, Pipeline

__all__ = ["HotPath", "Learning", "learning"]

_MAX_ENTRIES: Final = 512
_MAX_BYTES: Final = 32 * 1024 * 1024


@dataclass(slots=True)
class Learning:
    """Filled by the client's ``request()`` when the call it runs was answered from the cache."""

    call: Call | None = None


learning: ContextVar[Learning | None] = ContextVar("tokenguard_hot_learning", default=None)


@dataclass(frozen=True, slots=True)
class _Known:
    cache: Cache
    call: Call
    entry: CacheEntry
    answer: pydantic.BaseModel
    size: int


class HotPath:
    """One client's memory of recent hits: arguments → (cache key, entry, parsed answer)."""

    def __init__(self) -> None:
        self._known: OrderedDict[str, _Known] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def fingerprint(
        self, client: Any, pipeline: Pipeline, name: str, endpoint: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> str | None:
        """The exact identity of a call that may take the hot path, or ``None`` if it may not."""
        cache = pipeline.cache
        if cache is None or args or cache_control_active() or kwargs.get("stream"):
            return None
        # not needed for correctness (an uncacheable call is never learned), but it spares
        # the common uncached call the cost of a fingerprint
        extra = kwargs.get("extra_body")
        body: Mapping[str, Any] = {**kwargs, **extra} if isinstance(extra, Mapping) else kwargs
        if not (cache.cache_all or deterministic(body, endpoint)) or client._tg_providers():
            return None  # a key from a provider is known only when the request is made
        base_url, tenant, headers, query = client._tg_client_context()
        try:
            return json.dumps([name, base_url, tenant, headers, query, kwargs], sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError):  # not plain JSON (a model, a generator, a timeout object...)
            return None

    def answer(self, pipeline: Pipeline, fingerprint: str) -> Any:
        """The answer for a repeat, recorded as a hit; ``None`` when the ordinary path must run."""
        known = self._known.get(fingerprint)
        if known is None or pipeline.cache is not known.cache:
            return None
        key = known.call.cache_key
        assert key is not None
        if known.cache.lookup(key) is not known.entry:  # expired, replaced or unreadable
            self._forget(fingerprint)
            return None
        pipeline.record_repeat(known.call, known.entry)
        return known.answer.model_copy(deep=True)

    def learn(self, pipeline: Pipeline, fingerprint: str, taught: Learning, result: Any) -> None:
        """Remember the answer of a call the ordinary path served from the cache."""
        call = taught.call
        if call is None or call.cache_entry is None or pipeline.cache is None:
            return
        if not isinstance(result, pydantic.BaseModel):
            return
        size = len(fingerprint) + 4 * len(call.cache_entry.body)  # the parsed answer, roughly
        if size > _MAX_BYTES // 16:
            return
        known = _Known(pipeline.cache, call, call.cache_entry, result.model_copy(deep=True), size)
        with self._lock:
            old = self._known.pop(fingerprint, None)
            if old is not None:
                self._bytes -= old.size
            self._known[fingerprint] = known
            self._bytes += size
            while len(self._known) > _MAX_ENTRIES or self._bytes > _MAX_BYTES:
                _, gone = self._known.popitem(last=False)
                self._bytes -= gone.size

    def _forget(self, fingerprint: str) -> None:
        with self._lock:
            gone = self._known.pop(fingerprint, None)
            if gone is not None:
                self._bytes -= gone.size


def install(client: Any, resource: Any, name: str, endpoint: str, *, is_async: bool) -> None:
    """Put the hot path in front of ``resource.create`` (a resource this client owns)."""
    method: Callable[..., Any] = resource.create
    hot: HotPath = client._tg_hot

    if is_async:

        @functools.wraps(method)
        async def create_async(*args: Any, **kwargs: Any) -> Any:
            pipeline = client.guard.pipeline
            # a remote cache's lookup is a round trip: the ordinary path makes it off the event loop
            fingerprint = None if pipeline.remote else hot.fingerprint(client, pipeline, name, endpoint, args, kwargs)
            if fingerprint is None:
                return await method(*args, **kwargs)
            answer = hot.answer(pipeline, fingerprint)
            if answer is not None:
                return answer
            taught = Learning()
            token = learning.set(taught)
            try:
                result = await method(*args, **kwargs)
            finally:
                learning.reset(token)
            hot.learn(pipeline, fingerprint, taught, result)
            return result

        resource.create = create_async
        return

    @functools.wraps(method)
    def create(*args: Any, **kwargs: Any) -> Any:
        pipeline = client.guard.pipeline
        fingerprint = hot.fingerprint(client, pipeline, name, endpoint, args, kwargs)
        if fingerprint is None:
            return method(*args, **kwargs)
        answer = hot.answer(pipeline, fingerprint)
        if answer is not None:
            return answer
        taught = Learning()
        token = learning.set(taught)
        try:
            result = method(*args, **kwargs)
        finally:
            learning.reset(token)
        hot.learn(pipeline, fingerprint, taught, result)
        return result

    resource.create = create
