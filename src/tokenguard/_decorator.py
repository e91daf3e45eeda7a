"""``@tokenguard.guarded``: protect an existing function that calls an LLM inside.

Per call of the decorated function (sync or async, function or method):

- **scope**: ``function=<module.qualname>``, the decorator's attributes
  (``@guarded(user="batch")``) and ``scope_from(*args, **kwargs)`` are in force while it runs,
  so guarded clients inside are attributed to it;
- **loops**: the function and its arguments are fingerprinted and checked with the guard's
  loop detector (the same request → the same answer → the same bug);
- **cache**: with the guard's cache, a result is kept under the function's qualified name,
  the canonical JSON of its arguments and the scope (a user's answer is never another's); a
  repeat in the same scope returns it without running the function
  (results that are not plain JSON are not kept). A hit is a ``cache_hit`` ledger row that
  saved what the first run spent;
- **retry**: a vendor error that can succeed on a second try (and that no guarded client
  already retried) re-runs the function under the guard's ``Retry``;
- **cost**: guarded clients inside record their own calls. A vendor response returned by
  the function from an *unguarded* client is charged from its usage; otherwise ``cost=``
  (a callable of the result returning USD) is charged. ``outcome=`` (a callable of the
  result returning an outcome name or ``None``) records an outcome for the report.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, TypeVar, cast, overload

from ._cache import KEY_SCHEMA
from ._errors import ConfigurationError
from ._guard import Guard, default_guard
from ._loops import Prints
from ._pipeline import RunSink, spend_sink
from ._retry import Attempts, judge
from ._scope import current_scope, scope, validate_scope
from ._usage import Usage

__all__ = ["guarded", "spend_sink"]

log = logging.getLogger("tokenguard")

F = TypeVar("F", bound=Callable[..., Any])


_SKIPPED_FIRST = ("self", "cls")


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain JSON data (what a function-level cache can keep)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


class _Spec:
    """One decorated function's settings, resolved once."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        guard: Guard | None,
        cache: bool | None,
        retry: bool | None,
        loops: bool | None,
        scope_from: Callable[..., Mapping[str, Any]] | None,
        cost: Callable[[Any], Any] | None,
        outcome: Callable[[Any], str | None] | None,
        key: Callable[..., Any] | None,
        attrs: Mapping[str, Any],
    ) -> None:
        if guard is not None and not isinstance(guard, Guard):
            raise ConfigurationError("guarded.guard", guard, "must be a tokenguard.Guard (or None for the default)")
        for name, value in (("cache", cache), ("retry", retry), ("loops", loops)):
            if value is not None and not isinstance(value, bool):
                raise ConfigurationError(f"guarded.{name}", value, "must be True, False or None (the guard's setting)")
        callables: tuple[tuple[str, object], ...] = (
            ("scope_from", scope_from),
            ("cost", cost),
            ("outcome", outcome),
            ("key", key),
        )
        for label, given in callables:
            if given is not None and not callable(given):
                raise ConfigurationError(f"guarded.{label}", given, "must be callable")
        self.fn = fn
        self.name = f"{fn.__module__}.{fn.__qualname__}"
        self.guard = guard
        self.cache, self.retry, self.loops = cache, retry, loops
        self.scope_from, self.cost, self.outcome, self.key = scope_from, cost, outcome, key
        self.attrs = validate_scope(dict(attrs), setting="guarded")
        self.signature = inspect.signature(fn)

    def guard_now(self) -> Guard:
        return self.guard if self.guard is not None else default_guard()

    def scope_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, str]:
        # the calls made inside are attributed to the function (report --by function)
        attrs = {"function": self.name, **self.attrs}
        if self.scope_from is not None:
            attrs.update(validate_scope(dict(self.scope_from(*args, **kwargs)), setting="guarded.scope_from"))
        return attrs

    def material(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The canonical JSON of what the call was asked: the arguments (``self``/``cls``
        left out), or what ``key=`` makes of them. Raises a clear error for arguments that
        are not plain JSON."""
        if self.key is not None:
            given: Any = self.key(*args, **kwargs)
        else:
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            given = dict(bound.arguments)
            params = list(self.signature.parameters)
            if params and params[0] in _SKIPPED_FIRST:
                given.pop(params[0], None)
        try:
            return json.dumps([self.name, given], sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError):
            bad = {k: type(v).__name__ for k, v in (given.items() if isinstance(given, dict) else []) if not _plain(v)}
            raise ConfigurationError(
                f"guarded({self.name})",
                bad or type(given).__name__,
                "arguments must be plain JSON for the cache and the loop detector; pass key=lambda ...: <JSON "
                "that identifies the call>, or cache=False, loops=False",
            ) from None

    def digest(self, material: str) -> str:
        return hashlib.sha256(f"{KEY_SCHEMA}\x00fn\x00{material}".encode()).hexdigest()


class _Run:
    """One run of a decorated function: the checks before, the accounting after."""

    def __init__(self, spec: _Spec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.spec = spec
        self.guard = spec.guard_now()
        self.args, self.kwargs = args, kwargs
        self.scope = spec.scope_of(args, kwargs)
        pipeline = self.guard.pipeline
        self.use_cache = pipeline.cache is not None and spec.cache is not False
        self.use_loops = pipeline.loops is not None and spec.loops is not False
        self.key: str | None = None
        if self.use_cache or self.use_loops:
            # the scope is part of the key: a function that reads the current user's data inside
            # must never hand one user's answer to another (the loop detector is per scope too)
            where = json.dumps(sorted({**current_scope(), **self.scope}.items()))
            self.key = spec.digest(spec.material(args, kwargs) + "\x00" + where)
        self.started = time.perf_counter()

    def check_loops(self) -> None:
        loops = self.guard.pipeline.loops
        if not self.use_loops or loops is None or self.key is None:
            return
        merged = {**current_scope(), **self.scope}
        loop = loops.check(Prints(exact=self.key), merged)
        if loop is not None and loops.detector.mode == "block":
            self.guard.pipeline.record_external(
                vendor="function", endpoint=self.spec.name, model="-", usage=Usage(), cost=None,
                scope=merged, started=self.started, outcome="blocked", error="loop", attempts=0,
            )  # fmt: skip
            raise loop

    def cached(self) -> tuple[bool, Any]:
        cache = self.guard.pipeline.cache
        if not self.use_cache or cache is None or self.key is None:
            return False, None
        found = cache.get_value(self.key)
        if found is None:
            return False, None
        value, saved = found
        self.guard.pipeline.record_external(
            vendor="function", endpoint=self.spec.name, model="-", usage=Usage(), cost=Decimal(0),
            scope={**current_scope(), **self.scope}, started=self.started, outcome="cache_hit", saved=saved,
            attempts=0,
        )  # fmt: skip
        return True, value

    def finish(self, result: Any, sink: RunSink) -> None:
        """Charge what the function's result says it cost, keep it in the cache, record its outcome."""
        pipeline = self.guard.pipeline
        merged = {**current_scope(), **self.scope}
        charged = pipeline.charge_response(result, scope=merged, started=self.started, sink=sink)
        if charged is None and self.spec.cost is not None:
            usd = self.spec.cost(result)
            if usd is not None:
                try:
                    amount = Decimal(str(usd))
                except ArithmeticError:
                    raise ConfigurationError(f"guarded({self.spec.name}).cost", usd, "must return USD") from None
                if not amount.is_finite() or amount < 0:
                    raise ConfigurationError(f"guarded({self.spec.name}).cost", usd, "must return USD >= 0")
                pipeline.record_external(
                    vendor="function", endpoint=self.spec.name, model="-", usage=Usage(), cost=amount,
                    scope=merged, started=self.started, outcome="ok", attempts=1,
                )  # fmt: skip
                charged = amount
        if self.use_cache and self.key is not None and pipeline.cache is not None:
            if _plain(result):
                pipeline.drain()  # the guarded calls inside are settled: their spend is known
                total = sum(sink.spent, Decimal(0)) + (charged or Decimal(0))
                pipeline.cache.set_value(self.key, result, total)
            else:
                log.debug(
                    "tokenguard: %s returned %s, which is not plain JSON: not cached", self.spec.name, type(result)
                )
        self.record_outcome(result)

    def record_outcome(self, result: Any) -> None:
        """The outcome the result stands for (a cached answer is one too), if ``outcome=`` says."""
        if self.spec.outcome is not None:
            name = self.spec.outcome(result)
            if name:
                self.guard.record_outcome(name, 1, **self.scope)


def _retryable(exc: BaseException) -> bool:
    """A vendor error worth running the function again for, that no guarded client retried."""
    return not getattr(exc, "_tokenguard_retried", False) and judge(exc).retry


def _wrap(fn: Callable[..., Any], spec: _Spec) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            run = _Run(spec, args, kwargs)
            with scope(**run.scope):
                if run.guard.pipeline.remote:  # round trips to Redis: off the event loop
                    await asyncio.to_thread(run.check_loops)
                    hit, value = await asyncio.to_thread(run.cached)
                else:
                    run.check_loops()
                    hit, value = run.cached()
                if hit:
                    run.record_outcome(value)
                    return value
                sink = RunSink()
                token = spend_sink.set(sink)
                try:
                    retrier = run.guard.pipeline.retrier if spec.retry is not False else None

                    async def once(number: int, left: float | None) -> Any:
                        return await fn(*args, **kwargs)

                    if retrier is None:
                        result = await fn(*args, **kwargs)
                    else:
                        result = await retrier.run_async(_attempts(spec), once, retry_if=_retryable)
                finally:
                    spend_sink.reset(token)
                run.finish(result, sink)
                return result

        return run_async

    @functools.wraps(fn)
    def run_sync(*args: Any, **kwargs: Any) -> Any:
        run = _Run(spec, args, kwargs)
        with scope(**run.scope):
            run.check_loops()
            hit, value = run.cached()
            if hit:
                run.record_outcome(value)
                return value
            sink = RunSink()
            token = spend_sink.set(sink)
            try:
                retrier = run.guard.pipeline.retrier if spec.retry is not False else None
                if retrier is None:
                    result = fn(*args, **kwargs)
                else:
                    result = retrier.run(_attempts(spec), lambda number, left: fn(*args, **kwargs), retry_if=_retryable)
            finally:
                spend_sink.reset(token)
            run.finish(result, sink)
            return result

    return run_sync


def _attempts(spec: _Spec) -> Attempts:
    return Attempts("function", "", "", spec.name, lambda n, left: None, lambda e, v: None)


@overload
def guarded(fn: F, /) -> F: ...


@overload
def guarded(
    *,
    guard: Guard | None = None,
    cache: bool | None = None,
    retry: bool | None = None,
    loops: bool | None = None,
    scope_from: Callable[..., Mapping[str, Any]] | None = None,
    cost: Callable[[Any], Any] | None = None,
    outcome: Callable[[Any], str | None] | None = None,
    key: Callable[..., Any] | None = None,
    **attrs: str | int,
) -> Callable[[F], F]: ...


def guarded(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    guard: Guard | None = None,
    cache: bool | None = None,
    retry: bool | None = None,
    loops: bool | None = None,
    scope_from: Callable[..., Mapping[str, Any]] | None = None,
    cost: Callable[[Any], Any] | None = None,
    outcome: Callable[[Any], str | None] | None = None,
    key: Callable[..., Any] | None = None,
    **attrs: str | int,
) -> Any:
    """Protect a function that calls an LLM: ``@tokenguard.guarded`` or ``@tokenguard.guarded(...)``.

    Args:
        guard: the guard (default: ``tokenguard.default_guard()`` at call time).
        cache: ``None`` (default): cache results when the guard has a cache; ``False``: never.
        retry: ``None``: retry with the guard's ``Retry``; ``False``: never.
        loops: ``None``: check with the guard's loop detector; ``False``: never.
        scope_from: a callable of the function's arguments returning scope attributes
            (``scope_from=lambda ticket: {"project": ticket["queue"]}``).
        cost: a callable of the result returning its cost in USD, for functions whose LLM
            calls tokenguard cannot see (and that return no vendor response).
        outcome: a callable of the result returning an outcome name (or ``None``), recorded
            with ``tokenguard.record_outcome`` for the cost-per-outcome report.
        key: a callable of the arguments returning plain JSON that identifies the call, for
            the cache and the loop detector, when the arguments themselves are not JSON.
        **attrs: scope attributes for every call (``user="nightly-batch"``).
    """

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(function):
            raise ConfigurationError("guarded", function, "decorates a function or a method")
        spec = _Spec(
            function, guard=guard, cache=cache, retry=retry, loops=loops, scope_from=scope_from,
            cost=cost, outcome=outcome, key=key, attrs=attrs,
        )  # fmt: skip
        return _wrap(function, spec)

    if fn is not None:
        return decorate(fn)
    return cast(Callable[[F], F], decorate)
