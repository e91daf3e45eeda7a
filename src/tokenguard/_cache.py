"""The response cache: identical requests are answered from a store, at no cost.

Owns the configuration (``Cache``), the cache key, what is cacheable, the backends
(diskcache on disk, a bounded in-memory LRU) and single-flight. Entries are JSON — the
response bytes exactly as the vendor sent them, plus the usage and cost they had — never
pickle: a shared cache directory must not become a way to run code. A hit is replayed
through the SDK's own response processing (see ``_clients.py``), so it comes back as the
vendor's own type: a parsed model, a ``Stream``, a raw response.

A cache never makes a call worse: any backend failure (corrupt file, full disk,
unwritable directory) is logged once and the call goes to the vendor.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import logging
import os
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Protocol

import diskcache
import platformdirs

from ._canonical import canonical_json
from ._errors import ConfigurationError, StoreUnavailable
from ._redact import redact_url
from ._usage import Usage

_IN_DATABASE: Final = 1 << 40  # diskcache keeps values smaller than this in its database

__all__ = ["Cache", "CacheControl", "CacheEntry", "cache_control", "cache_key", "current_cache_control"]

log = logging.getLogger("tokenguard")

KEY_SCHEMA: Final = 1
"""Bumped whenever the key's recipe changes, so old entries are never misread."""

# request fields that cannot change what the model answers (everything else is in the key,
# unknown future fields included); stream_options: see _key_body
_NON_SEMANTIC: Final = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
# request headers that change the answer
_SEMANTIC_HEADERS: Final = ("anthropic-beta", "anthropic-version", "openai-beta")
# the decoded entries a Cache keeps in memory (each checked against the stored bytes on a hit)
_DECODED_ENTRIES: Final = 256
_DECODED_BYTES: Final = 32 * 1024 * 1024
_REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True, slots=True)
class CacheControl:
    """How the calls in a ``cache_control()`` block use the cache."""

    bypass: bool = False
    refresh: bool = False
    ttl_s: float | None = None
    always: bool = False


_DEFAULT_CONTROL: Final = CacheControl()
_CONTROL: ContextVar[CacheControl | None] = ContextVar("tokenguard_cache_control", default=None)


def cache_control_active() -> bool:
    """Whether a ``cache_control()`` block is in force in this thread / task."""
    return _CONTROL.get() is not None


def current_cache_control() -> CacheControl:
    """The cache control in force in this thread / task."""
    return _CONTROL.get() or _DEFAULT_CONTROL


@contextmanager
def cache_control(
    *, bypass: bool = False, refresh: bool = False, ttl_s: float | None = None, always: bool = False
) -> Iterator[None]:
    """Change how the calls inside the block use the response cache (one call, or a whole scope).

    ``bypass``: neither read nor write the cache. ``refresh``: do not read it, but store the
    fresh answer. ``ttl_s``: keep what these calls store for this long. ``always``: cache
    these calls even though they do not ask for a repeatable answer (Anthropic's API, for
    one, has no ``temperature`` or ``seed`` to ask with).
    """
    if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or ttl_s <= 0):
        raise ConfigurationError("cache_control.ttl_s", ttl_s, "must be a positive number of seconds")
    token = _CONTROL.set(
        CacheControl(bool(bypass), bool(refresh), None if ttl_s is None else float(ttl_s), bool(always))
    )
    try:
        yield
    finally:
        _CONTROL.reset(token)


def _normal(value: Any) -> Any:
    """``value`` with whole floats as ints, so ``temperature=0`` and ``0.0`` key alike."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    return value


def _canonical(value: Any) -> str:
    return canonical_json(_normal(value))


def _who() -> tuple[int, int]:
    """This thread, and this asyncio task if one is running (tasks share a thread)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return threading.get_ident(), id(task) if task is not None else 0


def _key_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body as the key sees it: the non-semantic fields dropped, and of stream_options
    only ``include_usage``, which changes what a replayed stream yields (a usage chunk)."""
    semantic = {k: v for k, v in body.items() if k not in _NON_SEMANTIC}
    options = semantic.pop("stream_options", None)
    if body.get("stream") and isinstance(options, Mapping) and options.get("include_usage"):
        semantic["stream_options"] = {"include_usage": True}
    return semantic


def cache_key(
    *,
    vendor: str,
    base_url: str,
    method: str,
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    tenant: str,
    query: Mapping[str, Any] | None = None,
) -> str:
    """The cache key: a hash of everything that can change the answer, and the tenant."""
    semantic = _key_body(body)
    picked = {name: headers[name] for name in _SEMANTIC_HEADERS if name in headers}
    material = _canonical(
        [KEY_SCHEMA, vendor, base_url.rstrip("/"), method.upper(), url, semantic, picked, tenant, query or {}]
    )
    return hashlib.sha256(material.encode()).hexdigest()


@functools.lru_cache(maxsize=1024)  # asked on every cacheable call, by the same few clients
def tenant_of(*secrets: str | None) -> str:
    """A fingerprint of the credentials (API key, organization, project): never the key itself."""
    material = "\x00".join(s or "" for s in secrets)
    return hashlib.sha256(("tokenguard-tenant\x00" + material).encode()).hexdigest()[:32]


def deterministic(body: Mapping[str, Any], endpoint: str) -> bool:
    """Whether the request asks for a repeatable answer: temperature 0, or a fixed seed;
    embeddings always are."""
    if endpoint == "embeddings":
        return True
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0:
        return True
    return body.get("seed") is not None


_PACK_FROM: Final = 8192  # smaller JSON is stored as it is: zlib costs ~80 µs a call to set up


def pack(text: bytes) -> bytes:
    """Stored bytes for a JSON document: itself when small, else zlib-compressed (a JSON object
    starts with ``{``, a zlib stream with ``x``: ``unpack`` tells them apart)."""
    return text if len(text) < _PACK_FROM else zlib.compress(text, 1)


def unpack(data: bytes) -> bytes:
    """The JSON document in stored bytes (``pack``)."""
    return data if data[:1] == b"{" else zlib.decompress(data)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One stored response: the bytes the vendor sent, and what the original call cost."""

    status: int
    content_type: str
    body: bytes
    usage: Usage
    cost_usd: Decimal | None
    model: str
    stored_at: float

    def to_json(self) -> bytes:
        """The stored form: JSON (never pickle), zlib-compressed when large (``pack``)."""
        doc = {
            "v": KEY_SCHEMA,
            "status": self.status,
            "content_type": self.content_type,
            "body": base64.b64encode(self.body).decode("ascii"),
            "usage": list(self.usage.counts()),
            "cost_usd": None if self.cost_usd is None else format(self.cost_usd, "f"),
            "model": self.model,
            "stored_at": self.stored_at,
        }
        return pack(json.dumps(doc, separators=(",", ":")).encode())

    @classmethod
    def from_json(cls, data: bytes) -> CacheEntry:
        """Parse the stored form; raises ``ValueError`` on anything unexpected."""
        doc = json.loads(unpack(data))
        if not isinstance(doc, dict) or doc.get("v") != KEY_SCHEMA:
            raise ValueError("not a tokenguard cache entry of this version")
        usage = doc["usage"]
        if not (isinstance(usage, list) and len(usage) == 6):
            raise ValueError("bad usage")
        cost = doc.get("cost_usd")
        return cls(
            status=int(doc["status"]),
            content_type=str(doc["content_type"]),
            body=base64.b64decode(doc["body"], validate=True),
            usage=Usage(*(int(n) for n in usage)),
            cost_usd=None if cost is None else Decimal(str(cost)),
            model=str(doc["model"]),
            stored_at=float(doc["stored_at"]),
        )


class _Backend(Protocol):
    remote: bool  # its round trips leave the process (the async clients make them off the event loop)

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    def delete(self, key: str) -> None: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...

    def usage(self) -> tuple[int, int]:
        """Entries and bytes stored."""
        ...


class _MemoryBackend:
    """A bounded, thread-safe LRU of byte values with a TTL each."""

    remote = False

    def __init__(self, max_bytes: int, clock: Callable[[], float]) -> None:
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._max = max_bytes
        self._clock = clock
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[1] <= self._clock():
                self._pop(key)
                return None
            self._data.move_to_end(key)
            return item[0]

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        with self._lock:
            if key in self._data:
                self._pop(key)
            self._data[key] = (value, self._clock() + ttl_s)
            self._bytes += len(value)
            while self._bytes > self._max and self._data:
                self._pop(next(iter(self._data)))

    def _pop(self, key: str) -> None:
        value, _ = self._data.pop(key)
        self._bytes -= len(value)

    def delete(self, key: str) -> None:
        with self._lock:
            if key in self._data:
                self._pop(key)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def close(self) -> None:
        self.clear()

    def usage(self) -> tuple[int, int]:
        with self._lock:
            return len(self._data), self._bytes


class _JSONOnlyDisk(diskcache.Disk):  # type: ignore[misc]  # diskcache ships no type hints
    """diskcache storage that refuses pickle both ways: str keys and bytes values only, and a
    stored pickle (say, planted in a shared directory) is an error, never loaded."""

    def put(self, key: Any) -> Any:
        if type(key) is not str:
            raise TypeError("tokenguard cache keys are str")
        return super().put(key)

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise ValueError("refusing a pickled cache key")
        return super().get(key, raw)

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if type(value) is not bytes:
            raise TypeError("tokenguard cache values are bytes")
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: Any, value: Any, read: bool) -> Any:
        if mode == diskcache.core.MODE_PICKLE:
            raise ValueError("refusing a pickled cache value")
        return super().fetch(mode, filename, value, read)


class _DiskBackend:
    """diskcache in a directory: embedded, shared by processes, bounded, with a TTL per entry.

    Eviction is by age of storage ("least-recently-stored"): with diskcache's LRU policy every
    read is a write transaction (the access time), which made a hit ~8x slower and serialised
    readers across processes.

    Private to the user, whatever the umask: a directory tokenguard creates is 0700, and the
    database is created 0600 before diskcache opens it (SQLite gives its ``-wal``/``-shm`` files
    the database's mode). Every value is kept inside that database (``disk_min_file_size``):
    diskcache would write large values as separate files with the umask's mode.
    """

    remote = False

    def __init__(self, path: Path, max_bytes: int) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with suppress(FileExistsError):
            os.close(os.open(path / "cache.db", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
        self._cache = diskcache.Cache(
            str(path),
            disk=_JSONOnlyDisk,
            size_limit=max_bytes,
            eviction_policy="least-recently-stored",
            disk_min_file_size=_IN_DATABASE,
        )

    def get(self, key: str) -> bytes | None:
        value = self._cache.get(key, default=None)
        return value if isinstance(value, bytes) else None

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._cache.set(key, value, expire=ttl_s)

    def delete(self, key: str) -> None:
        self._cache.delete(key)

    def clear(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        self._cache.close()

    def usage(self) -> tuple[int, int]:
        return len(self._cache), int(self._cache.volume())


class _RedisBackend:
    """Entries in Redis under ``<prefix>:c:``, shared by every process that uses the same URL.

    Values are the same JSON bytes as on disk (never pickle). Redis bounds the size itself:
    give it a ``maxmemory`` and an eviction policy (``volatile-lru`` evicts only entries
    with a TTL, which every cache entry has). Every command has a timeout (``?timeout=``,
    default 0.25 s); after a failure Redis is skipped for a second, so a dead Redis makes
    calls uncached, not slow.
    """

    remote = True

    def __init__(self, url: str) -> None:
        from .stores.redis_store import redis_client, split_url, url_number, url_switch

        target, options = split_url(url)
        prefix = options.get("prefix", "tokenguard")
        timeout_s = url_number(options, "timeout", 0.25, 0.001, 60, setting="Cache.backend")
        self._prefix = f"{prefix}:c:"
        cluster = url_switch(options, "cluster", setting="Cache.backend")
        self._client = redis_client(target, timeout_s=timeout_s, cluster=cluster)
        import redis

        self._errors: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)
        self._down_until = 0.0

    def _run(self, op: Callable[[], Any], default: Any) -> Any:
        if self._down_until > time.monotonic():
            return default
        try:
            return op()
        except self._errors:
            self._down_until = time.monotonic() + 1.0
            raise

    def get(self, key: str) -> bytes | None:
        value = self._run(lambda: self._client.get(self._prefix + key), None)
        return value if isinstance(value, bytes) else None

    def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._run(lambda: self._client.set(self._prefix + key, value, px=max(int(ttl_s * 1000), 1)), None)

    def delete(self, key: str) -> None:
        self._run(lambda: self._client.delete(self._prefix + key), None)

    def _keys(self) -> Iterator[bytes]:
        yield from self._client.scan_iter(match=self._prefix + "*", count=1000)

    def clear(self) -> None:
        for name in self._keys():  # one key per command: on a Cluster, keys live on different nodes
            self._client.unlink(name)

    def close(self) -> None:
        from .stores.redis_store import close_client

        close_client(self._client)

    def usage(self) -> tuple[int, int]:
        entries = size = 0
        pipe = self._client.pipeline(transaction=False)
        for name in self._keys():
            pipe.strlen(name)
            entries += 1
        for length in pipe.execute():
            size += int(length)
        return entries, size


class Cache:
    """The response cache: identical requests are answered from the cache, at $0.

    Args:
        backend: ``"disk"`` (default: diskcache in the user cache directory, shared by
            processes), ``"memory"`` (a bounded LRU in this process), or a ``"redis://"``
            URL (shared by a fleet; ``?prefix=``, ``?timeout=`` and ``?cluster=true`` in its query string;
            Redis's ``maxmemory`` bounds its size, not ``max_size_mb``).
        path: the disk cache's directory.
        ttl_s: how long an entry is served.
        max_size_mb: the cache's total size bound (the oldest stored entries go first).
        max_entry_kb: responses larger than this are not stored.
        cache_all: also cache requests that do not ask for a repeatable answer. By
            default only deterministic requests are cached: ``temperature=0``, a fixed
            ``seed``, and embeddings.
        share_across_keys: serve entries to other API keys / organizations / projects
            (off: each credential has its own entries; only a fingerprint of it is kept).
        clock: seconds since the epoch (for tests).
    """

    def __init__(
        self,
        backend: str = "disk",
        path: str | os.PathLike[str] | None = None,
        ttl_s: float = 86_400,
        *,
        max_size_mb: float = 512,
        max_entry_kb: float = 4_096,
        cache_all: bool = False,
        share_across_keys: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        remote = isinstance(backend, str) and backend.startswith(_REDIS_SCHEMES)
        if backend not in ("disk", "memory") and not remote:
            raise ConfigurationError("Cache.backend", backend, 'use "disk", "memory" or a redis:// URL')
        for name, value in (("ttl_s", ttl_s), ("max_size_mb", max_size_mb), ("max_entry_kb", max_entry_kb)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigurationError(f"Cache.{name}", value, "must be a positive number")
        self.backend_name = redact_url(backend) if remote else backend
        self.ttl_s = float(ttl_s)
        self.max_entry_bytes = int(max_entry_kb * 1024)
        self.max_size_mb = float(max_size_mb)
        self.cache_all = bool(cache_all)
        self.share_across_keys = bool(share_across_keys)
        self._clock = clock
        self._warned: set[str] = set()
        max_bytes = int(max_size_mb * 1024 * 1024)
        self._store: _Backend | None
        self.path: Path | None = None
        if backend == "memory":
            self._store = _MemoryBackend(max_bytes, clock)
        elif remote:
            self._store = _RedisBackend(backend)
        else:
            self.path = Path(path).expanduser() if path else platformdirs.user_cache_path("tokenguard") / "responses"
            try:
                self._store = _DiskBackend(self.path, max_bytes)
            except Exception as err:  # an unwritable directory must not fail calls: run uncached
                self._warn(
                    f"the response cache at {self.path} cannot be opened, so calls go uncached: {err} "
                    f"(if its files are damaged, `tokenguard cache clear --path {self.path}` starts it afresh)"
                )
                self._store = None
        self._max_bytes = max_bytes
        self._flights: dict[str, tuple[threading.Event, tuple[int, int]]] = {}
        self._flights_lock = threading.Lock()
        # the last entries decoded, by key, with the stored bytes they came from: a hit on an
        # unchanged entry skips zlib, JSON and base64, and returns the very same CacheEntry
        self._decoded: OrderedDict[str, tuple[bytes, CacheEntry]] = OrderedDict()
        self._decoded_bytes = 0
        self._decoded_lock = threading.Lock()

    def _warn(self, message: str) -> None:
        """Log a cache problem once per kind (a broken cache must not flood the log)."""
        kind = message.split(":")[0]
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("tokenguard: %s", message)

    # -- entries ------------------------------------------------------------------------------

    def lookup(self, key: str) -> CacheEntry | None:
        """The live entry for ``key``, or ``None`` (a broken entry is dropped, never fatal)."""
        if self._store is None:
            return None
        try:
            data = self._store.get(key)
            if data is None:
                return None
            known = self._decoded.get(key)
            if known is not None and (known[0] is data or known[0] == data):
                return known[1]
            entry = CacheEntry.from_json(data)
            self._remember(key, data, entry)
            return entry
        except Exception as err:
            self._warn(f"a response cache entry could not be read and was skipped: {err}")
            with suppress(Exception):
                self._store.delete(key)
            return None

    def _remember(self, key: str, data: bytes, entry: CacheEntry) -> None:
        size = len(data) + len(entry.body)
        if size > _DECODED_BYTES // 16:
            return
        with self._decoded_lock:
            old = self._decoded.pop(key, None)
            if old is not None:
                self._decoded_bytes -= len(old[0]) + len(old[1].body)
            self._decoded[key] = (data, entry)
            self._decoded_bytes += size
            while len(self._decoded) > _DECODED_ENTRIES or self._decoded_bytes > _DECODED_BYTES:
                _, (gone, gone_entry) = self._decoded.popitem(last=False)
                self._decoded_bytes -= len(gone) + len(gone_entry.body)

    def save(self, key: str, entry: CacheEntry, ttl_s: float | None = None) -> None:
        """Store ``entry`` (too large ones are skipped); failures are logged, never raised."""
        if self._store is None or len(entry.body) > self.max_entry_bytes:
            return
        try:
            self._store.set(key, entry.to_json(), self.ttl_s if ttl_s is None else ttl_s)
        except Exception as err:
            self._warn(f"a response could not be stored in the cache: {err}")

    def get_value(self, key: str) -> tuple[Any, Decimal | None] | None:
        """A ``@guarded`` function's cached result and what its first run cost, or ``None``."""
        if self._store is None:
            return None
        try:
            data = self._store.get(key)
            if data is None:
                return None
            doc = json.loads(unpack(data))
            if not isinstance(doc, dict) or doc.get("v") != KEY_SCHEMA or doc.get("kind") != "function":
                raise ValueError("not a tokenguard function result of this version")
            cost = doc.get("cost_usd")
            return doc["value"], None if cost is None else Decimal(str(cost))
        except Exception as err:
            self._warn(f"a cached function result could not be read and was skipped: {err}")
            with suppress(Exception):
                self._store.delete(key)
            return None

    def set_value(self, key: str, value: Any, cost_usd: Decimal | None, ttl_s: float | None = None) -> None:
        """Keep a ``@guarded`` function's result (plain JSON) and what it cost; never raises."""
        if self._store is None:
            return
        try:
            doc = {
                "v": KEY_SCHEMA,
                "kind": "function",
                "value": value,
                "cost_usd": None if cost_usd is None else str(cost_usd),
            }
            data = pack(json.dumps(doc, separators=(",", ":"), allow_nan=False).encode())
            if len(data) <= self.max_entry_bytes:
                self._store.set(key, data, self.ttl_s if ttl_s is None else ttl_s)
        except Exception as err:
            self._warn(f"a function result could not be stored in the cache: {err}")

    @property
    def remote(self) -> bool:
        """Whether the entries live outside this process's memory and disk (Redis)."""
        return self._store is not None and self._store.remote

    def usage(self) -> tuple[int, int]:
        """Entries and bytes stored (``(0, 0)`` when the cache could not be opened)."""
        return (0, 0) if self._store is None else self._store.usage()

    def clear(self) -> None:
        """Drop every entry. A disk cache whose database is damaged (it could not be opened, or
        cannot be emptied) is started afresh: its database files are removed and created again; raises
        ``StoreUnavailable`` if that fails too (say, the directory is not writable)."""
        with self._decoded_lock:
            self._decoded.clear()
            self._decoded_bytes = 0
        if self._store is not None:
            try:
                self._store.clear()
                return
            except Exception:
                if self.path is None:  # Redis, memory: nothing to start afresh
                    raise
                with suppress(Exception):
                    self._store.close()
                self._store = None  # a damaged database: start afresh, below
        if self.path is None:
            return
        try:
            for name in ("cache.db", "cache.db-wal", "cache.db-shm"):  # diskcache's files, nothing else
                (self.path / name).unlink(missing_ok=True)
            self._store = _DiskBackend(self.path, self._max_bytes)
        except Exception as err:
            raise StoreUnavailable("cache", str(self.path), f"cannot be started afresh: {err}") from None
        self._warned.clear()

    def close(self) -> None:
        """Release the backend."""
        if self._store is not None:
            self._store.close()

    def now(self) -> float:
        """The cache clock."""
        return self._clock()

    # -- single flight ------------------------------------------------------------------------

    def lead(self, key: str) -> threading.Event | None:
        """Become the one caller fetching ``key`` (returns its event, set when done), or get
        ``None`` when another caller already is (then ``follow`` it)."""
        with self._flights_lock:
            if key in self._flights:
                return None
            event = threading.Event()
            self._flights[key] = (event, _who())
            return event

    def follow(self, key: str) -> threading.Event | None:
        """The event of the caller currently fetching ``key`` — unless that caller is this
        very thread (or asyncio task), which cannot finish while it waits: then ``None``."""
        with self._flights_lock:
            flight = self._flights.get(key)
        if flight is None or flight[1] == _who():
            return None
        return flight[0]

    def land(self, key: str, event: threading.Event) -> None:
        """End a flight: wake the callers waiting for it."""
        with self._flights_lock:
            flight = self._flights.get(key)
            if flight is not None and flight[0] is event:
                del self._flights[key]
        event.set()

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"Cache(backend={self.backend_name!r}{where}, ttl_s={self.ttl_s:g})"
