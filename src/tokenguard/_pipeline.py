"""The one path every money-spending call takes: admit → send → observe usage → settle → record.

Vendor-neutral and sans-I/O apart from the ledger write: the client shells
(``_clients.py``) call ``begin()`` before sending, hand each successful HTTP response to
``observe()``, and report failures to ``failed()``. Settling turns what a response
reported (or, when a stream carried no usage or was cut short, an estimate from the
request and the text received) into a priced ``LedgerRow``. Settling never raises into
the caller: a bug or a store outage here must not cost the user a response they paid for.
"""

from __future__ import annotations

import atexit
import collections
import functools
import json
import logging
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import httpx2
import pydantic

from ._budget import BudgetBook, Hold
from ._cache import Cache, CacheEntry, cache_key, current_cache_control, deterministic
from ._errors import BudgetExceeded, CircuitOpen, StoreUnavailable, UnpricedModelError, UnpricedModelWarning
from ._ledger import LedgerRow, Outcome, Store
from ._loops import LoopBook, Prints, prints_of
from ._observe import install_tap
from ._pricing import PriceBook, RateCard
from ._retry import Retrier, reached_vendor
from ._scope import current_scope
from ._sse import head_and_tail, iter_sse
from ._telemetry import Telemetry, log_call
from ._tokens import count_messages_tokens, count_tokens, tiktoken_encoding
from ._usage import Usage
from .providers import Adapter, Endpoint, Observed
from .providers._base import IMAGE_TOKENS, bound_of, media_parts

__all__ = ["Call", "Pipeline", "RunSink", "spend_sink"]


@dataclass(slots=True)
class RunSink:
    """What the guarded calls made inside one run of a ``@guarded`` function leave behind:
    what they cost (the function's cache entry remembers it, as what a later hit saved) and
    the responses they returned (so the function returning one is not charged twice)."""

    spent: list[Decimal] = field(default_factory=list)
    responses: list[Any] = field(default_factory=list)


spend_sink: ContextVar[RunSink | None] = ContextVar("tokenguard_spend_sink", default=None)

log = logging.getLogger("tokenguard")

_warned_unpriced: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


@dataclass(slots=True)
class Call:
    """One logical call in flight."""

    adapter: Adapter
    endpoint: Endpoint
    body: Mapping[str, Any]
    model: str
    stream: bool
    scope: Mapping[str, str]
    ts: datetime
    started: float
    # HTTP requests sent for this call; an attempt is in flight (sent, not yet answered or failed)
    attempts: int = 0
    sending: bool = False
    settled: int = field(default=0)
    hold: Hold | None = None
    # what failed attempts that the vendor may have billed (timeouts) were charged
    carried_usage: Usage | None = None
    carried_cost: Decimal = Decimal(0)
    # a response was handed to the pipeline (its settling may still be queued)
    observed: bool = False
    # the response cache: the key this call is stored under, the entry that answers it,
    # the flight it leads (followers wait on it) or waits for
    cache_key: str | None = None
    cache_entry: CacheEntry | None = None
    cache_ttl_s: float | None = None
    flight: threading.Event | None = None
    waiting: threading.Event | None = None
    # the loop detector's fingerprints of the body (computed once, reused by repeats)
    prints: Prints | None = None
    # the caller's OpenTelemetry context, when telemetry is on (the call's span goes under it)
    otel_context: Any = None
    # where this call's cost is also added (a decorated function's run), if anywhere
    sink: RunSink | None = None
    # the client's base URL, when a circuit breaker needs it (an open circuit refuses the call
    # before anything is reserved or noted by the loop detector)
    base_url: str | None = None
    # settling in the caller's thread (to store a cache entry before identical calls go on):
    # the ledger row and the budget settle are then queued, off the caller's path
    record_later: bool = False


class Pipeline:
    """The decisions and bookkeeping of a ``Guard``, shared by every client it guards."""

    def __init__(
        self,
        *,
        store: Store,
        prices: PriceBook,
        require_prices: bool,
        budgets: BudgetBook | None = None,
        cache: Cache | None = None,
        retrier: Retrier | None = None,
        loops: LoopBook | None = None,
        telemetry: Telemetry | None = None,
        default_max_output_tokens: int = 32_768,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        defer_s: float = 0.02,
    ) -> None:
        self.store = store
        self.prices = prices
        self.require_prices = require_prices
        self.budgets = budgets if budgets else None
        self.cache = cache
        self.retrier = retrier
        self.loops = loops
        self.telemetry = telemetry
        # state in another process (Redis): the async clients make its round trips in a worker
        # thread, so that a slow or distant Redis never blocks their event loop
        self.remote = bool(getattr(store, "remote", False)) or bool(cache is not None and cache.remote)
        self.default_max_output_tokens = default_max_output_tokens
        self._now = wall_clock
        self._unsaved: list[LedgerRow] = []
        self._unsaved_lock = threading.Lock()
        # settling (pricing, the ledger row, the budget settle) runs off the caller's path:
        # queued here, drained by a worker within defer_s, or at once by any read (see drain())
        self.defer_s = defer_s
        self._priced: set[tuple[str, str]] = set()
        self._budget_batch: list[tuple[Hold | None, Mapping[str, str], Usage, Decimal | None]] | None = None
        self._batching_thread: int | None = None
        self._queue: collections.deque[Callable[[], None]] = collections.deque()
        self._queue_cond = threading.Condition()
        self._drain_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        if budgets:
            budgets.before_refusal = self.drain
        _pipelines.add(self)
        _register_exit_hook()

    # -- deferred settling -------------------------------------------------------------------

    def _defer(self, work: Callable[[], None]) -> None:
        if self.defer_s <= 0:
            work()
            return
        with self._queue_cond:
            self._queue.append(work)
            if self._worker is None:
                self._worker = threading.Thread(
                    target=_drain_loop,
                    args=(weakref.ref(self), self._queue, self._queue_cond, self.defer_s),
                    name="tokenguard-settle",
                    daemon=True,
                )
                self._worker.start()
            if len(self._queue) == 1:
                self._queue_cond.notify()

    def drain(self) -> None:
        """Settle everything queued, now, in this thread (reads and refusals call this first).

        The budget settles of the drained calls go to the store as one transaction.
        """
        with self._drain_lock:
            self._budget_batch = []
            self._batching_thread = threading.get_ident()
            try:
                while True:
                    try:
                        work = self._queue.popleft()
                    except IndexError:
                        break
                    try:
                        work()
                    except Exception:
                        log.exception("tokenguard: settling a call failed")
            finally:
                batch, self._budget_batch, self._batching_thread = self._budget_batch, None, None
                if batch and self.budgets is not None:
                    try:
                        self.budgets.settle_many(batch)
                    except Exception:  # the holds expire on their own; never lose the drain
                        log.exception("tokenguard: could not settle the budgets of %d call(s)", len(batch))

    @property
    def pending(self) -> int:
        """Calls whose settling is still queued."""
        return len(self._queue)

    # -- admit -------------------------------------------------------------------------------

    def begin(
        self,
        adapter: Adapter,
        method: str,
        url: str,
        body: Any,
        stream: bool,
        cache_context: Callable[[], tuple[str, str, Mapping[str, str], Mapping[str, Any]]] | None = None,
        base_url: str | None = None,
    ) -> Call | None:
        """Start a call, or return ``None`` for a request that costs nothing (it passes untouched).

        With a cache, a call may come back answered (``call.cache_entry``: replay it) or
        told to wait for an identical call in flight (``call.waiting``: wait on it, then
        ``resume()``). Raises a tokenguard error, after recording a ``blocked`` row, when
        the call must not be sent. ``cache_context`` gives (base URL, tenant, headers);
        ``base_url`` names the call's circuit, when the guard has a circuit breaker.
        """
        endpoint = adapter.endpoint(method, url)
        if endpoint is None:
            return None
        if not isinstance(body, Mapping):
            body = {}
        call = Call(
            adapter=adapter,
            endpoint=endpoint,
            body=body,
            model=adapter.request_model(body),
            stream=bool(stream or body.get("stream")),
            scope=current_scope(),
            ts=self._now(),
            started=time.perf_counter(),
            base_url=base_url,
        )
        if self.telemetry is not None:
            call.otel_context = self.telemetry.current()
        call.sink = spend_sink.get()
        if self.cache is not None and cache_context is not None:
            control = current_cache_control()
            wanted = control.always or self.cache.cache_all or deterministic(body, endpoint.name)
            if not control.bypass and wanted:
                base_url, tenant, headers, query = cache_context()
                call.cache_key = cache_key(
                    vendor=adapter.vendor,
                    base_url=base_url,
                    method=method,
                    url=url,
                    body={**body, "stream": call.stream},
                    headers=headers,
                    tenant="shared" if self.cache.share_across_keys else tenant,
                    query=query,
                )
                call.cache_ttl_s = control.ttl_s
                if not control.refresh:
                    return self.resume(call)
                call.flight = self.cache.lead(call.cache_key)
        return self._admit(call)

    def resume(self, call: Call, *, gave_up: bool = False) -> Call:
        """Look the call up in the cache (again, after waiting): answered, waiting or admitted.

        ``gave_up``: the wait for an identical call timed out; go ahead without it.
        """
        assert self.cache is not None
        assert call.cache_key is not None
        call.waiting = None
        entry = self.cache.lookup(call.cache_key)
        if entry is not None:
            call.cache_entry = entry
            if self.loops is not None and self.loops.detector.count_cache_hits:
                self._check_loop(call)  # a loop answered from the cache is still a loop
            return call
        if gave_up:
            return self._admit(call)
        call.flight = self.cache.lead(call.cache_key)
        if call.flight is None:
            waiting = self.cache.follow(call.cache_key)
            if waiting is not None:
                call.waiting = waiting
                return call
            call.flight = self.cache.lead(call.cache_key)  # the flight landed meanwhile
        return self._admit(call)

    def _admit(self, call: Call, *, first: bool = True) -> Call:
        """The checks before sending: the price, every budget's reservation, then (once per
        call, not per retry) the loop detector — last, so that a call refused for another
        reason is not a repeat."""
        adapter, endpoint, body = call.adapter, call.endpoint, call.body
        budgets = self.budgets
        if first and call.base_url is not None and self.retrier is not None:
            try:
                self.retrier.refuse_if_open(adapter.vendor, call.base_url, call.model)
            except CircuitOpen:
                self._block(call, "circuit_open")
                self.land(call)
                raise
        if not self.require_prices and budgets is None:
            if first and self.loops is not None:
                self._check_loop(call)
            return call
        card = self.prices.card(adapter.vendor, call.model)
        if card is None and (self.require_prices or (budgets is not None and budgets.has_usd)):
            # fail closed: a USD cap cannot be kept on a call whose price is unknown
            self._block(call, "unpriced")
            raise UnpricedModelError(adapter.vendor, call.model)
        if budgets is not None:
            usd, tokens = self._worst_case(call, card, adapter.input_bound(endpoint, body))
            try:
                call.hold = budgets.admit(
                    call.scope, usd, tokens, retry_with=lambda: self._tighter_worst_case(call, card)
                )
            except BudgetExceeded:
                self._block(call, "budget")
                self.land(call)
                raise
        if first and self.loops is not None:
            self._check_loop(call)  # releases the reservation if it refuses the call
        return call

    def _release(self, call: Call) -> None:
        """Give back the call's reservation (it will not be sent, or its attempt failed unbilled)."""
        if call.hold is not None and self.budgets is not None:
            try:
                self.budgets.settle(call.hold, call.scope, Usage(), Decimal(0))
            except Exception:  # the hold expires on its own
                log.exception("tokenguard: could not release the budgets of a %s call", call.endpoint.name)
            call.hold = None

    def land(self, call: Call) -> None:
        """End the call's cache flight, if it leads one (followers look the cache up again)."""
        if call.flight is not None and self.cache is not None and call.cache_key is not None:
            self.cache.land(call.cache_key, call.flight)
            call.flight = None

    # -- attempts (retries) -------------------------------------------------------------------

    def sending(self, call: Call) -> None:
        """An attempt of the call is about to be sent."""
        call.attempts += 1
        call.sending = True

    def readmit(self, call: Call) -> None:
        """Before a retry: the checks of a first attempt again (the budgets may have filled up
        meanwhile). Raises, after recording a ``blocked`` row, when the retry must not be sent."""
        try:
            self._admit(call, first=False)
        except BudgetExceeded as err:  # say that earlier attempts were sent (and maybe billed)
            sent = call.attempts
            err.args = (str(err).replace("Nothing was sent;", f"This retry was not sent ({sent} attempt(s) were);"),)
            raise

    def _check_loop(self, call: Call) -> None:
        """Note the call with the loop detector; raise ``LoopDetected`` (after recording a
        ``blocked`` row) when it continues a loop in block mode."""
        loops = self.loops
        assert loops is not None
        if call.endpoint.name == "embeddings":  # ingestion re-embeds boilerplate chunks by design
            return
        try:
            if call.prints is None:
                call.prints = prints_of(
                    loops.detector, call.adapter.vendor, call.endpoint.name, call.body, now=loops.now()
                )
            loop = loops.check(call.prints, call.scope)
        except StoreUnavailable as err:  # the store is down (and says so once): one line per call
            log.warning("tokenguard: the loop detector could not check a %s call: %s", call.endpoint.name, err)
            return
        except Exception:  # a broken loop store must not fail every call: the check is skipped
            log.exception("tokenguard: the loop detector could not check a %s call", call.endpoint.name)
            return
        if loop is not None and loops.detector.mode == "block":
            self._release(call)
            self._block(call, "loop")
            self.land(call)
            raise loop

    def retrying(self, call: Call, *, billed: bool) -> None:
        """Settle a failed attempt that will be retried: its hold is released, or — when the
        vendor may have billed it (a timeout after the request was sent) — kept as an
        estimated charge, so that retried timeouts cannot silently overshoot a cap."""
        call.sending = False
        if not billed:
            self._release(call)
            return
        usage, cost = self._billed_estimate(call)
        if self.budgets is not None:
            try:
                self.budgets.settle(call.hold, call.scope, usage, cost)
            except Exception:  # the hold expires on its own; the retry must not fail for this
                log.exception("tokenguard: could not settle the budgets of a failed %s attempt", call.endpoint.name)
        call.hold = None
        call.carried_usage = usage if call.carried_usage is None else call.carried_usage + usage
        call.carried_cost += cost or Decimal(0)

    def _billed_estimate(self, call: Call) -> tuple[Usage, Decimal | None]:
        """What an attempt the vendor may have billed is charged: what was reserved for it
        (its worst case), or the worst case when nothing was reserved."""
        input_tokens = call.adapter.input_bound(call.endpoint, call.body)
        if call.hold is not None and call.hold.claims:
            claim = call.hold.claims[0][2]
            return Usage(input_tokens=input_tokens, output_tokens=max(claim.tokens - input_tokens, 0)), claim.usd
        card = self.prices.card(call.adapter.vendor, call.model)
        _, tokens = self._worst_case(call, card, input_tokens)
        usage = Usage(input_tokens=input_tokens, output_tokens=max(tokens - input_tokens, 0))
        return usage, self._price(call, call.model, usage, {})

    def record_external(
        self,
        *,
        vendor: str,
        endpoint: str,
        model: str,
        usage: Usage,
        cost: Decimal | None,
        scope: Mapping[str, str],
        started: float,
        outcome: Outcome = "ok",
        error: str | None = None,
        saved: Decimal | None = None,
        attempts: int = 1,
    ) -> None:
        """A ledger row for what tokenguard did not send itself (a ``@guarded`` function: its
        cache hits and loop blocks, an unguarded client's response it returned, the cost it
        reported), its spend settled on the budgets (there was no reservation)."""
        if self.budgets is not None and outcome not in ("blocked", "cache_hit"):
            try:
                self.budgets.settle(None, scope, usage, cost)
            except Exception:
                log.exception("tokenguard: could not settle the budgets of %s", endpoint)
        row = LedgerRow(
            ts=self._now(),
            vendor=vendor,
            endpoint=endpoint,
            model=model,
            scope=MappingProxyType(dict(scope)),
            usage=usage,
            cost_usd=cost,
            estimated=False,
            outcome=outcome,
            error=error,
            attempts=attempts,
            latency_s=time.perf_counter() - started,
            stream=False,
            saved_usd=saved,
        )
        self.write(row)
        log_call(row)

    def charge_response(
        self, result: Any, *, scope: Mapping[str, str], started: float, sink: RunSink | None = None
    ) -> Decimal | None:
        """Charge a vendor response that an unguarded client produced (a ``@guarded``
        function returned it): its usage, priced. ``None`` when ``result`` is not one, or
        when a guarded client already recorded it (it is in ``sink``)."""
        found = _vendor_response(result)
        if found is None or (sink is not None and any(r is result for r in sink.responses)):
            return None
        adapter, endpoint = found
        seen = adapter.from_json(endpoint, result)
        if seen.usage is None:
            return None
        model = seen.model or str(getattr(result, "model", "") or "unknown")
        cost = self.prices.cost(adapter.vendor, model, seen.usage, seen.price_context)
        self.record_external(
            vendor=adapter.vendor,
            endpoint=endpoint.name,
            model=model,
            usage=seen.usage,
            cost=cost,
            scope=scope,
            started=started,
        )
        return cost

    def record_hit(self, call: Call) -> None:
        """A call answered from the cache: $0, outcome cache_hit, the original cost saved."""
        entry = call.cache_entry
        assert entry is not None
        call.observed = True
        self._defer(
            lambda: self._record(
                call,
                Usage(),
                Decimal(0),
                outcome="cache_hit",
                error=None,
                estimated=False,
                model=entry.model,
                saved=entry.cost_usd,
            )
        )

    def record_repeat(self, like: Call, entry: CacheEntry) -> None:
        """A repeat of the answered call ``like``, served from ``entry`` without reaching the
        SDK's request path (the clients' hot path): the same row a hit makes, after the same
        loop check (raises ``LoopDetected``)."""
        call = Call(
            adapter=like.adapter,
            endpoint=like.endpoint,
            body=like.body,
            model=like.model,
            stream=like.stream,
            scope=current_scope(),
            ts=self._now(),
            started=time.perf_counter(),
            cache_key=like.cache_key,
            cache_entry=entry,
            prints=like.prints,
            sink=spend_sink.get(),
        )
        if self.loops is not None and self.loops.detector.count_cache_hits:
            self._check_loop(call)
        self.record_hit(call)

    def _block(self, call: Call, reason: str) -> None:
        call.observed = True  # accounted for: failed() must not add an error row

        def record() -> None:
            try:
                self._record(call, Usage(), None, outcome="blocked", error=reason, estimated=False)
            except Exception:  # a broken store must not replace the reason the call was refused
                log.exception("tokenguard: could not record a blocked %s call", call.endpoint.name)

        self._defer(record)

    def _worst_case(self, call: Call, card: RateCard | None, input_tokens: int) -> tuple[Decimal, int]:
        """The most this call can cost: (USD, input + output tokens)."""
        output = call.adapter.output_bound(call.endpoint, call.body)
        if output is None:
            output = (card.context_window if card else None) or self.default_max_output_tokens
        usd = card.worst_case(input_tokens, output) if card is not None else Decimal(0)
        return usd, input_tokens + output

    def _tighter_worst_case(self, call: Call, card: RateCard | None) -> tuple[Decimal, int] | None:
        """With a local tokenizer, the worst case from an exact count of the text (budget nearly spent)."""
        if tiktoken_encoding(call.model) is None:
            return None
        texts, messages = call.adapter.input_texts(call.endpoint, call.body)
        exact = count_messages_tokens(texts, call.model, messages=messages)
        # framing the count leaves out (tool schemas, response formats, media) stays bounded by bytes
        rest = {k: v for k, v in call.body.items() if k in ("tools", "response_format", "text", "output_config")}
        bound = exact + messages + (bound_of(rest, 0) if rest else 0) + IMAGE_TOKENS * media_parts(call.body)
        return self._worst_case(call, card, bound)

    # -- observe -----------------------------------------------------------------------------

    def observe(self, call: Call, response: httpx2.Response, *, is_async: bool, parsed: Any = None) -> None:
        """Account for one successful HTTP response: now if its body is read, else as it streams.

        ``parsed`` is what the SDK made of a read body (a vendor model), when there is one:
        its usage is read from it instead of decoding the JSON a second time.
        """
        call.observed = True
        if call.sink is not None and parsed is not None:
            call.sink.responses.append(parsed)
        answered_by: str | None = None
        try:
            if parsed is not None and isinstance(getattr(parsed, "usage", None), pydantic.BaseModel):
                # the usage is read from the vendor's own object, off the caller's path too
                answered_by = getattr(parsed, "model", None)
                self._settle_later(
                    call,
                    lambda: self._settle_seen(
                        call,
                        _ResponseMeta.of(response),
                        call.adapter.from_json(call.endpoint, parsed),
                        error=None,
                        body=response.content,
                    ),
                )
            elif response.is_stream_consumed:
                content = response.content
                self._settle_later(
                    call, lambda: self._settle_body(call, _ResponseMeta.of(response), content, error=None, raw=False)
                )
            else:
                meta = _ResponseMeta.of(response)
                # the callback must not hold the response: the tap's finalizer would keep it alive
                install_tap(
                    response,
                    lambda body, error: self._settle_later(
                        call, lambda: self._settle_body(call, meta, body, error=error, raw=True)
                    ),
                    is_async=is_async,
                )
            # after the call is queued: a warning turned into an error cannot lose its row
            self._warn_if_unpriced(call, answered_by)
        except Exception:
            log.exception("tokenguard: could not account for a %s call", call.endpoint.name)

    def _settle_later(self, call: Call, work: Callable[[], None]) -> None:
        """Settle off the caller's path, except a call whose answer goes into the cache: it
        settles (and so stores its answer) at once, then lets any identical calls waiting for
        it go, so that the next identical call is already a hit."""
        if call.flight is None and call.cache_key is None:
            self._defer(work)
            return
        call.record_later = True
        try:
            work()
        finally:
            self.land(call)

    def failed(self, call: Call, exc: BaseException) -> None:
        """Record a call that raised before any response was accounted for."""
        self.land(call)
        if call.settled or call.observed:
            return
        call.observed = True
        billed = call.sending and reached_vendor(exc)
        call.sending = False
        self._defer(lambda: self._record_failure(call, exc, billed))

    def _record_failure(self, call: Call, exc: BaseException, billed: bool) -> None:
        try:
            name = type(exc).__name__
            if isinstance(exc, CircuitOpen):  # refused before sending
                self._record(call, Usage(), None, outcome="blocked", error="circuit_open", estimated=False)
            elif billed:
                # the request reached the vendor, which may have done (and billed) all of it
                usage, cost = self._billed_estimate(call)
                self._record(call, usage, cost, outcome="error", error=name, estimated=True)
            else:
                self._record(call, Usage(), Decimal(0), outcome="error", error=name, estimated=False)
        except Exception:
            log.exception("tokenguard: could not record a failed %s call", call.endpoint.name)

    # -- settle ------------------------------------------------------------------------------

    def _settle_body(
        self,
        call: Call,
        meta: _ResponseMeta,
        body: bytes,
        *,
        error: str | None,
        raw: bool,
    ) -> None:
        try:
            if raw:
                body = _decoded(meta.content_encoding, body)
            seen = self._read(call, meta, body, want_text=False)
            self._settle_seen(call, meta, seen, error=error, body=body)
        except Exception:
            log.exception("tokenguard: could not settle a %s call", call.endpoint.name)

    def _settle_seen(
        self, call: Call, meta: _ResponseMeta, seen: Observed, *, error: str | None, body: bytes | None = None
    ) -> None:
        try:
            if error is not None:
                seen.error = error
            # a terminal event marks the end even if the caller closed before reading the final bytes
            exact = seen.usage is not None and seen.finished and seen.error is None
            if not exact and body is not None:
                # the usage is missing or partial in the stream's ends: read it all, this time
                # keeping the output text (an estimate needs it)
                seen = self._read(call, meta, body, want_text=True)
                if error is not None:
                    seen.error = error
                exact = seen.usage is not None and seen.finished and seen.error is None
            if exact:
                assert seen.usage is not None
                usage = seen.usage
            else:
                usage = self._estimate(call, seen, started=bool(body))
            outcome: Outcome
            if seen.error is not None:
                outcome = "error"
            elif seen.finished:
                outcome = "ok"  # estimated when a finished stream simply carried no usage
            else:
                outcome = "incomplete"
            model = seen.model or call.model
            cost = self._price(call, model, usage, seen.price_context)
            record = functools.partial(
                self._record,
                call,
                usage,
                cost,
                outcome=outcome,
                error=seen.error,
                estimated=not exact,
                model=model,
                request_id=meta.request_id,
            )
            if call.record_later:
                self._defer(record)
            else:
                record()
            # a finished answer is stored (a stream that carried no usage, with its estimated cost)
            if call.cache_key is not None and outcome == "ok" and body and self.cache is not None:
                # a refusal can sit anywhere in a stream: every event is read when a byte scan
                # cannot rule one out
                if "text/event-stream" in meta.content_type and call.adapter.may_refuse(body):
                    seen = self._read(call, meta, body, want_text=True)
                if seen.refused:
                    return
                # only a complete, reported, non-refused answer is worth serving again
                self.cache.save(
                    call.cache_key,
                    CacheEntry(200, meta.content_type, body, usage, cost, model, self.cache.now()),
                    call.cache_ttl_s,
                )
        except Exception:
            log.exception("tokenguard: could not settle a %s call", call.endpoint.name)

    def _read(self, call: Call, meta: _ResponseMeta, body: bytes, *, want_text: bool) -> Observed:
        if "text/event-stream" in meta.content_type:
            # the ends of a stream carry its cost; the whole of it is read only to estimate from the text
            events = list(iter_sse(body)) if want_text else head_and_tail(body)
            return call.adapter.from_events(call.endpoint, events, want_text=want_text)
        try:
            data = json.loads(body)
        except ValueError:
            return Observed(error="invalid_json")
        if not isinstance(data, Mapping):
            return Observed(error="invalid_json")
        return call.adapter.from_json(call.endpoint, data)

    def _estimate_input(self, call: Call) -> int:
        texts, messages = call.adapter.input_texts(call.endpoint, call.body)
        return count_messages_tokens(texts, call.model, messages=messages)

    def _estimate(self, call: Call, seen: Observed, *, started: bool = False) -> Usage:
        """Usage for a response that reported none, or only part: count what arrived.

        ``started``: the server began answering, so it has generated (and bills) at least
        one output token even if no text arrived yet.
        """
        reported = seen.usage or Usage()
        counted = count_tokens("".join(seen.text_parts), seen.model or call.model)
        output = max(reported.output_tokens, counted, 1 if started and not seen.finished else 0)
        input_tokens = reported.input_tokens or self._estimate_input(call)
        return Usage(
            input_tokens=input_tokens,
            output_tokens=output,
            cache_read_tokens=min(reported.cache_read_tokens, input_tokens),
            cache_write_tokens=min(reported.cache_write_tokens, input_tokens - reported.cache_read_tokens),
            cache_write_1h_tokens=min(reported.cache_write_1h_tokens, reported.cache_write_tokens),
            reasoning_tokens=min(reported.reasoning_tokens, output),
        )

    def _price(self, call: Call, model: str, usage: Usage, context: Mapping[str, str]) -> Decimal | None:
        vendor = call.adapter.vendor
        cost = self.prices.cost(vendor, model, usage, context)
        if cost is None and model != call.model:
            cost = self.prices.cost(vendor, call.model, usage, context)
        return cost

    def _warn_if_unpriced(self, call: Call, answered_by: str | None) -> None:
        """Warn, in the caller's thread, once per model, when the call will be recorded unpriced."""
        vendor = call.adapter.vendor
        model = answered_by or call.model
        if (vendor, model) in self._priced:  # a model once priced stays priced
            return
        if self.prices.card(vendor, model) is not None or self.prices.card(vendor, call.model) is not None:
            self._priced.add((vendor, model))
            return
        key = (vendor, model)
        with _warned_lock:
            if key in _warned_unpriced:
                return
            _warned_unpriced.add(key)
        warnings.warn(
            f"tokenguard: no price is known for {vendor} model {model!r}; its calls are recorded "
            f"unpriced. Register one with tokenguard.register_price({model!r}, input_mtok=..., output_mtok=...)",
            UnpricedModelWarning,
            stacklevel=2,
        )

    def _record(
        self,
        call: Call,
        usage: Usage,
        cost: Decimal | None,
        *,
        outcome: Outcome,
        error: str | None,
        estimated: bool,
        model: str | None = None,
        request_id: str | None = None,
        saved: Decimal | None = None,
    ) -> None:
        call.settled += 1
        if self.budgets is not None and outcome != "cache_hit" and (outcome != "blocked" or call.hold is not None):
            if self._budget_batch is not None and self._batching_thread == threading.get_ident():
                self._budget_batch.append((call.hold, call.scope, usage, cost))  # settled as one batch
            else:
                try:
                    self.budgets.settle(call.hold, call.scope, usage, cost)
                except Exception:  # the hold expires on its own; the call's answer must not be lost
                    log.exception("tokenguard: could not settle the budgets of a %s call", call.endpoint.name)
        if call.carried_usage is not None:  # earlier attempts the vendor may have billed
            usage = usage + call.carried_usage
            if cost is not None or call.carried_cost:
                cost = call.carried_cost + (cost or Decimal(0))
            estimated = True
        row = LedgerRow(
            ts=call.ts,
            vendor=call.adapter.vendor,
            endpoint=call.endpoint.name,
            model=model or call.model,
            scope=call.scope,
            usage=usage,
            cost_usd=cost,
            estimated=estimated,
            outcome=outcome,
            error=error,
            attempts=call.attempts,
            latency_s=time.perf_counter() - call.started,
            stream=call.stream,
            request_id=request_id,
            saved_usd=saved,
        )
        self.write(row)
        if call.sink is not None and cost:
            call.sink.spent.append(cost)
        log_call(row)
        if self.telemetry is not None:
            try:
                self.telemetry.record(row, call.otel_context)
            except Exception:  # telemetry must never cost the call its accounting
                log.exception("tokenguard: could not emit telemetry for a %s call", call.endpoint.name)

    def write(self, row: LedgerRow) -> None:
        """Write a row; if the store is down, keep it and write it with the next row that succeeds."""
        if not self._unsaved:
            try:
                self.store.record(row)
            except StoreUnavailable as err:
                with self._unsaved_lock:
                    self._unsaved.append(row)
                log.error("tokenguard: ledger write failed, 1 row kept in memory: %s", err)
            return
        with self._unsaved_lock:
            pending, self._unsaved = [*self._unsaved, row], []
        for i, item in enumerate(pending):
            try:
                self.store.record(item)
            except StoreUnavailable as err:
                with self._unsaved_lock:
                    self._unsaved[:0] = pending[i:]
                log.error("tokenguard: ledger write failed, %d row(s) kept in memory: %s", len(pending) - i, err)
                return

    @property
    def unsaved(self) -> int:
        """Rows kept in memory because the store could not take them yet (after draining the queue)."""
        self.drain()
        return len(self._unsaved)


_META_HEADERS = frozenset({b"content-type", b"content-encoding", b"x-request-id", b"request-id"})


def _drain_loop(
    ref: weakref.ref[Pipeline],
    queue: collections.deque[Callable[[], None]],
    cond: threading.Condition,
    delay: float,
) -> None:
    """Drain a pipeline's queue in batches; exit once the pipeline is gone.

    Holds the pipeline only while draining (queued work itself keeps it alive until done).
    """
    while True:
        with cond:
            while not queue:
                cond.wait(1.0)
                if not queue and ref() is None:
                    return
        time.sleep(delay)  # let a batch gather: fewer wake-ups, fewer GIL hand-offs
        pipeline = ref()
        if pipeline is None:
            return
        pipeline.drain()
        del pipeline


_pipelines: weakref.WeakSet[Pipeline] = weakref.WeakSet()


def _drain_all() -> None:
    for pipeline in list(_pipelines):
        pipeline.drain()


def _forget_queued_in_child() -> None:
    # work queued in the parent is the parent's; a child starts with fresh locks and no worker
    for pipeline in list(_pipelines):
        pipeline._queue.clear()
        pipeline._queue_cond = threading.Condition()
        pipeline._drain_lock = threading.Lock()
        pipeline._worker = None


os.register_at_fork(after_in_child=_forget_queued_in_child)
_exit_hook_registered = False


def _register_exit_hook() -> None:
    """Drain at exit, registered at the first pipeline: after the stores' own exit hooks, so
    (exit hooks run last-registered first) the rows it settles are then written by them."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        _exit_hook_registered = True
        atexit.register(_drain_all)


@dataclass(frozen=True, slots=True)
class _ResponseMeta:
    """What settling needs from a response's headers (the response itself is not kept)."""

    content_type: str
    content_encoding: str
    request_id: str | None

    @classmethod
    def of(cls, response: httpx2.Response) -> _ResponseMeta:
        # one pass over the raw headers: httpx2's Headers.get costs a scan per call
        found: dict[bytes, bytes] = {}
        for name, value in response.headers.raw:
            lower = name.lower()
            if lower in _META_HEADERS and lower not in found:
                found[lower] = value
        request_id = found.get(b"x-request-id") or found.get(b"request-id")
        return cls(
            found.get(b"content-type", b"").decode("latin-1"),
            found.get(b"content-encoding", b"identity").decode("latin-1").strip().lower(),
            request_id.decode("latin-1") if request_id else None,
        )


def _decoded(encoding: str, body: bytes) -> bytes:
    """The raw body with any content-encoding (gzip, br ...) undone, as httpx2 does for the caller."""
    if encoding in ("", "identity"):
        return body
    try:
        return httpx2.Response(200, headers={"content-encoding": encoding}, content=body).read()
    except Exception:  # a body cut off mid-frame: estimate from the request instead
        return b""


def _vendor_response(result: Any) -> tuple[Adapter, Endpoint] | None:
    """The adapter and endpoint of a vendor response object, if ``result`` is one (of an SDK
    that is loaded: a response of the other cannot exist, and importing it costs seconds)."""
    from .providers import AnthropicAdapter, OpenAIAdapter
    from .providers.anthropic import MESSAGES
    from .providers.openai import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES

    if "openai" in sys.modules:
        import openai.types
        import openai.types.chat
        import openai.types.responses

        if isinstance(result, openai.types.chat.ChatCompletion):
            return OpenAIAdapter("openai"), CHAT
        if isinstance(result, openai.types.responses.Response):
            return OpenAIAdapter("openai"), RESPONSES
        if isinstance(result, openai.types.Completion):
            return OpenAIAdapter("openai"), COMPLETIONS
        if isinstance(result, openai.types.CreateEmbeddingResponse):
            return OpenAIAdapter("openai"), EMBEDDINGS
    if "anthropic" in sys.modules:
        import anthropic.types

        if isinstance(result, anthropic.types.Message):
            return AnthropicAdapter(), MESSAGES
    return None
