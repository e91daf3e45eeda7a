"""Bounded retry: tokenguard owns the one retry layer (the SDKs' own are forced off).

Built on tenacity. ``judge()`` decides what can succeed on a second try: connection
errors, timeouts, 408, 409, 429 rate limits, 500, 502, 503, 504 and 529, and whatever the
server marks with ``x-should-retry`` — but never a 4xx that will fail again, a 402, nor a
429 that says the quota or the money is gone. ``Retrier`` runs the attempts of one call:
exponential backoff with jitter, the server's ``Retry-After`` (capped by ``max_delay_s``), a
deadline on the whole call's wall time (sleeps and attempts), a retry budget shared by
every call of the guard (so an outage does not become a retry storm), and an optional
circuit breaker per (vendor, base URL, model). What an attempt costs is the pipeline's
business: the client shells pass ``before_attempt`` (re-check the budgets) and
``after_failure`` (settle the failed attempt) hooks.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import httpx2
import tenacity

from ._errors import CircuitOpen, ConfigurationError
from ._redact import redact_url
from ._sdks import classes

__all__ = ["CircuitBreaker", "CutTimeout", "Retrier", "Retry", "Verdict", "judge"]

log = logging.getLogger("tokenguard")

T = TypeVar("T")

# statuses worth a second try (anthropic's 529 "overloaded" included)
RETRY_STATUSES: Final = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# error codes and types that mean the quota or the money is gone: retrying cannot help
_MONEY_CODES: Final = frozenset(
    {
        "insufficient_quota",
        "billing_hard_limit_reached",
        "billing_not_active",
        "access_terminated",
        "budget_exceeded",
    }
)
_MONEY_CLASSES: Final = frozenset(
    {
        "EnforcedSpendLimitReachedError",
        "ContractSpendLimitReachedError",
        "LinkedOrganizationSpendLimitReachedError",
    }
)
# ... and the same said in words, by proxies and gateways (LiteLLM's "Budget has been exceeded")
_MONEY_WORDS: Final = re.compile(
    r"insufficient[_ ]quota|exceeded your (current )?quota|budget (has been )?exceeded|exceeded .{0,20}budget"
    r"|spend(ing)? limit|credit balance|billing",
    re.IGNORECASE,
)


def _positive_number(setting: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or math.isinf(value):
        raise ConfigurationError(setting, value, "must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(setting, value, "must be a positive number" + (" or 0" if allow_zero else ""))
    return float(value)


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """Fail fast for ``cool_down_s`` after ``failures`` consecutive failed attempts against
    one (vendor, base URL, model); then let one trial call through (it closes the circuit if
    it succeeds, and re-opens it if it fails). Only upstream faults count: timeouts,
    connection errors, 429, 5xx — never a request the server rejected as bad."""

    failures: int = 5
    cool_down_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.failures, bool) or not isinstance(self.failures, int) or self.failures < 1:
            raise ConfigurationError("CircuitBreaker.failures", self.failures, "must be an int >= 1")
        _positive_number("CircuitBreaker.cool_down_s", self.cool_down_s)


class Retry:
    """How a guard retries calls that failed in a way that can succeed on a second try.

    Args:
        attempts: the most attempts per call, the first one included (1: never retry).
        initial_delay_s: the first backoff; each next one doubles, up to ``max_delay_s``.
        max_delay_s: the longest single sleep, a server's ``Retry-After`` included.
        deadline_s: the most wall time one call may take, attempts and sleeps included
            (``None``: no deadline). Each attempt's HTTP timeouts are cut to what is left,
            and a call gives up at once, with the vendor's error, when the next sleep (or
            the server's ``Retry-After``) would end past the deadline.
        jitter: multiply each backoff by a random factor in [0.75, 1] so that clients
            failing together do not retry together.
        retry_budget: retries allowed, as a fraction of the calls the guard started in the
            last ``retry_budget_window_s`` (``None``: no budget). When it is spent, a failed
            call fails at once with the vendor's error.
        retry_budget_window_s: the sliding window of the retry budget.
        min_retries: retries always allowed per window, whatever the fraction (so a quiet
            program can still retry its one call).
        circuit_breaker: a ``CircuitBreaker``, or ``None`` (default) for none.
    """

    def __init__(
        self,
        attempts: int = 4,
        initial_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        deadline_s: float | None = 120.0,
        *,
        jitter: bool = True,
        retry_budget: float | None = 0.2,
        retry_budget_window_s: float = 60.0,
        min_retries: int = 10,
        circuit_breaker: CircuitBreaker | None = None,
    ) -> None:
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
            raise ConfigurationError("Retry.attempts", attempts, "must be an int from 1 to 100 (the first try counts)")
        self.attempts = attempts
        self.initial_delay_s = _positive_number("Retry.initial_delay_s", initial_delay_s, allow_zero=True)
        self.max_delay_s = _positive_number("Retry.max_delay_s", max_delay_s, allow_zero=True)
        if self.max_delay_s < self.initial_delay_s:
            raise ConfigurationError("Retry.max_delay_s", max_delay_s, "must be at least initial_delay_s")
        self.deadline_s = None if deadline_s is None else _positive_number("Retry.deadline_s", deadline_s)
        if not isinstance(jitter, bool):
            raise ConfigurationError("Retry.jitter", jitter, "must be True or False")
        self.jitter = jitter
        if retry_budget is not None:
            retry_budget = _positive_number("Retry.retry_budget", retry_budget, allow_zero=True)
            if retry_budget > 1:
                raise ConfigurationError("Retry.retry_budget", retry_budget, "must be a fraction from 0 to 1, or None")
        self.retry_budget = retry_budget
        self.retry_budget_window_s = _positive_number("Retry.retry_budget_window_s", retry_budget_window_s)
        if isinstance(min_retries, bool) or not isinstance(min_retries, int) or min_retries < 0:
            raise ConfigurationError("Retry.min_retries", min_retries, "must be an int >= 0")
        self.min_retries = min_retries
        if circuit_breaker is not None and not isinstance(circuit_breaker, CircuitBreaker):
            raise ConfigurationError("Retry.circuit_breaker", circuit_breaker, "must be a tokenguard.CircuitBreaker")
        self.circuit_breaker = circuit_breaker

    def __repr__(self) -> str:
        return (
            f"Retry(attempts={self.attempts}, initial_delay_s={self.initial_delay_s:g}, "
            f"max_delay_s={self.max_delay_s:g}, deadline_s={self.deadline_s!r}, retry_budget={self.retry_budget!r})"
        )


# -- what can succeed on a second try ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a failed attempt means for the next one."""

    retry: bool
    reason: str  # for logs and the ledger: "429", "timeout", "insufficient_quota" ...
    retry_after_s: float | None = None  # what the server asked for
    billed: bool = False  # the request reached the vendor, which may bill it (a timed-out answer)
    upstream: bool = False  # a fault of the vendor's side (counts toward the circuit breaker)


# transport errors after which the whole request had reached the vendor (a write timeout or a
# pool timeout means it had not: nothing the vendor could act on)
_SENT_ERRORS: Final = (httpx2.ReadTimeout, httpx2.RemoteProtocolError, httpx2.ReadError)
_UNSENT_TIMEOUTS: Final = (httpx2.ConnectTimeout, httpx2.PoolTimeout, httpx2.WriteTimeout)


def reached_vendor(exc: BaseException) -> bool:
    """Whether a failed attempt had reached the vendor (who may bill the work it did)."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, classes("APIConnectionError")):
        timed_out = isinstance(exc, classes("APITimeoutError"))
        return isinstance(cause, _SENT_ERRORS) or (timed_out and not isinstance(cause, _UNSENT_TIMEOUTS))
    return isinstance(exc, _SENT_ERRORS) or type(exc).__name__ in ("CancelledError", "KeyboardInterrupt")


def retry_after(headers: httpx2.Headers) -> float | None:
    """Seconds the server asked to wait: ``retry-after-ms``, else ``retry-after`` in seconds or
    as an HTTP date; ``None`` when absent, unreadable or not positive."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
        except ValueError:
            pass  # unreadable: as the SDKs do, fall back to retry-after
        else:
            return value if 0 < value < math.inf else None
    try:
        text = headers.get("retry-after")
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            when = email.utils.parsedate_to_datetime(text)
            value = when.timestamp() - time.time()
        return value if 0 < value < math.inf else None
    except (TypeError, ValueError, OverflowError):
        return None


def _money_gone(exc: Any) -> str | None:
    """The reason a status error says the quota or the money is gone, if it does."""
    if exc.status_code == 402:
        return "payment_required"
    if type(exc).__name__ in _MONEY_CLASSES:
        return type(exc).__name__
    body: dict[str, Any] = exc.body if isinstance(exc.body, dict) else {}
    inner = body.get("error")
    error: dict[str, Any] = inner if isinstance(inner, dict) else body
    for field in ("code", "type", "error_code"):
        for source in (getattr(exc, field, None), error.get(field)):
            if isinstance(source, str) and source in _MONEY_CODES:
                return source
    said = error.get("message")
    message = said if isinstance(said, str) else str(exc)
    if exc.status_code == 429 and _MONEY_WORDS.search(message):
        return "quota"
    return None


def judge(exc: BaseException) -> Verdict:
    """Whether the call that raised ``exc`` is worth another attempt, and how long to wait."""
    if isinstance(exc, classes("APIConnectionError")):  # APITimeoutError included
        kind = "timeout" if isinstance(exc, classes("APITimeoutError")) else "connection"
        return Verdict(True, kind, billed=reached_vendor(exc), upstream=True)
    if isinstance(exc, classes("RetryableError")):  # raised by anthropic middleware to ask for a retry
        return Verdict(True, "retryable")
    if not isinstance(exc, classes("APIStatusError")):
        return Verdict(False, type(exc).__name__, billed=reached_vendor(exc))
    failed: Any = exc  # an APIStatusError of one of the SDKs
    status: int = failed.status_code
    money = _money_gone(exc)
    if money is not None:
        return Verdict(False, money)
    headers: httpx2.Headers = failed.response.headers
    wait = retry_after(headers)
    should = headers.get("x-should-retry", "").strip().lower()
    upstream = status == 429 or status >= 500
    if should == "false":
        return Verdict(False, f"{status} (x-should-retry: false)", wait, upstream=upstream)
    if should == "true" or status in RETRY_STATUSES:
        return Verdict(True, str(status), wait, upstream=upstream)
    return Verdict(False, str(status), wait, upstream=upstream and status != 501)


# -- shared state of a guard: the retry budget and the circuit breakers ------------------------


class _RetryBudget:
    """Retries allowed over a sliding window: ``max(min_retries, ratio * calls started)``.

    Per-second buckets, so taking and noting are O(1) amortised and memory is bounded by
    the window.
    """

    def __init__(self, ratio: float, window_s: float, min_retries: int, clock: Callable[[], float]) -> None:
        self._ratio = ratio
        self._window = window_s
        self._min = min_retries
        self._clock = clock
        self._buckets: deque[list[float]] = deque()  # [second, calls, retries]
        self._calls = 0.0
        self._retries = 0.0
        self._lock = threading.Lock()

    def _bucket(self) -> list[float]:
        now = math.floor(self._clock())
        while self._buckets and self._buckets[0][0] <= now - self._window:
            _, calls, retries = self._buckets.popleft()
            self._calls -= calls
            self._retries -= retries
        if not self._buckets or self._buckets[-1][0] != now:
            self._buckets.append([now, 0, 0])
        return self._buckets[-1]

    def note_call(self) -> None:
        with self._lock:
            self._bucket()[1] += 1
            self._calls += 1

    def take(self) -> bool:
        """Spend one retry, if the budget allows it."""
        with self._lock:
            bucket = self._bucket()
            if self._retries + 1 > max(self._min, self._ratio * self._calls):
                return False
            bucket[2] += 1
            self._retries += 1
            return True


@dataclass(slots=True)
class _Circuit:
    failures: int = 0
    open_until: float = 0.0
    trial: bool = False  # a trial call is in flight (half-open)
    last_error: str = ""


class _Breakers:
    _MAX: Final = 4096

    def __init__(self, config: CircuitBreaker, clock: Callable[[], float]) -> None:
        self._config = config
        self._clock = clock
        self._circuits: OrderedDict[tuple[str, str, str], _Circuit] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, target: tuple[str, str, str]) -> None:
        """Raise ``CircuitOpen`` if calls to ``target`` must fail fast now."""
        with self._lock:
            circuit = self._circuits.get(target)
            if circuit is None or circuit.failures < self._config.failures:
                return
            left = circuit.open_until - self._clock()
            if left > 0 or circuit.trial:
                raise self._refusal(target, circuit, left)
            circuit.trial = True  # half-open: this call is the trial

    def succeeded(self, target: tuple[str, str, str]) -> None:
        with self._lock:
            circuit = self._circuits.pop(target, None)
        if circuit is not None and circuit.failures >= self._config.failures:
            vendor, base_url, model = target
            log.warning("tokenguard: circuit for %s model %r at %s closed again", vendor, model, base_url)

    def failed(self, target: tuple[str, str, str], error: str) -> None:
        with self._lock:
            circuit = self._circuits.get(target)
            if circuit is None:
                circuit = self._circuits[target] = _Circuit()
                while len(self._circuits) > self._MAX:
                    self._circuits.popitem(last=False)
            circuit.failures += 1
            circuit.last_error = error
            circuit.trial = False
            if circuit.failures >= self._config.failures:
                circuit.open_until = self._clock() + self._config.cool_down_s
                opened = True
            else:
                opened = False
        if opened:
            vendor, base_url, model = target
            log.warning(
                "tokenguard: circuit for %s model %r at %s open for %gs after %d failures in a row (last: %s)",
                vendor,
                model,
                base_url,
                self._config.cool_down_s,
                circuit.failures,
                error,
            )

    def refuse_if_open(self, target: tuple[str, str, str]) -> None:
        """Raise ``CircuitOpen`` if ``target``'s circuit is open now (changing nothing: the
        attempt itself still goes through ``admit``)."""
        with self._lock:
            circuit = self._circuits.get(target)
            if circuit is None or circuit.failures < self._config.failures:
                return
            left = circuit.open_until - self._clock()
            if left > 0:
                raise self._refusal(target, circuit, left)

    @staticmethod
    def _refusal(target: tuple[str, str, str], circuit: _Circuit, left: float) -> CircuitOpen:
        return CircuitOpen(
            target=target, failures=circuit.failures, retry_in_s=max(left, 0.0), last_error=circuit.last_error
        )

    def is_open(self, target: tuple[str, str, str]) -> bool:
        """Whether calls to ``target`` fail fast right now."""
        with self._lock:
            circuit = self._circuits.get(target)
            return (
                circuit is not None and circuit.failures >= self._config.failures and self._clock() < circuit.open_until
            )

    def released(self, target: tuple[str, str, str]) -> None:
        """A trial call ended in a way that says nothing about the vendor (say, a bad request)."""
        with self._lock:
            circuit = self._circuits.get(target)
            if circuit is not None:
                circuit.trial = False


def bounded_timeout(timeout: Any, left_s: float) -> httpx2.Timeout:
    """``timeout`` (an ``httpx2.Timeout``, a number, or ``None``) with every part cut to ``left_s``."""
    if isinstance(timeout, httpx2.Timeout):
        parts = {
            "connect": timeout.connect,
            "read": timeout.read,
            "write": timeout.write,
            "pool": timeout.pool,
        }
    elif isinstance(timeout, int | float) and not isinstance(timeout, bool):
        parts = dict.fromkeys(("connect", "read", "write", "pool"), float(timeout))
    else:
        parts = dict.fromkeys(("connect", "read", "write", "pool"), None)
    cut = {k: left_s if v is None else min(float(v), left_s) for k, v in parts.items()}
    return httpx2.Timeout(**cut)


class CutTimeout(httpx2.Timeout):
    """A timeout cut to what a call's deadline leaves, remembering the one it was cut from.

    The SDK keeps a call's options on what it returns (a page keeps them for
    ``get_next_page()``); a later call that arrives with a cut timeout starts again from
    ``original``, so a deadline never leaks into another call.
    """

    def __init__(self, original: Any, left_s: float) -> None:
        cut = bounded_timeout(original, left_s)
        super().__init__(connect=cut.connect, read=cut.read, write=cut.write, pool=cut.pool)
        self.original = original


# -- running the attempts of one call ----------------------------------------------------------


@dataclass(slots=True)
class Attempts:
    """The identity and hooks of one call, for ``Retrier.run`` / ``run_async``."""

    vendor: str
    base_url: str
    model: str  # "" for a call that costs nothing
    endpoint: str
    # before attempt n (1-based) is sent, with the seconds the deadline leaves (None: no deadline)
    before_attempt: Callable[[int, float | None], None]
    # after a failed attempt that will be retried
    after_failure: Callable[[BaseException, Verdict], None]
    replayable: bool = True  # the request body can be sent again

    @property
    def target(self) -> tuple[str, str, str]:
        """The circuit breaker's key: (vendor, base URL without credentials, model)."""
        return circuit_target(self.vendor, self.base_url, self.model)

    @property
    def what(self) -> str:
        """The call, for logs: ``openai chat.completions (gpt-4o)``."""
        return f"{self.vendor} {self.endpoint}" + (f" ({self.model})" if self.model else "")


def circuit_target(vendor: str, base_url: str, model: str) -> tuple[str, str, str]:
    """A circuit breaker's key: (vendor, base URL without credentials, model)."""
    return vendor, redact_url(base_url).rstrip("/"), model


class Retrier:
    """A guard's retrying: the policy, the retry budget and the circuit breakers."""

    def __init__(self, config: Retry, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._budget = (
            _RetryBudget(config.retry_budget, config.retry_budget_window_s, config.min_retries, clock)
            if config.retry_budget is not None
            else None
        )
        self._breakers = _Breakers(config.circuit_breaker, clock) if config.circuit_breaker else None
        self.breaks = self._breakers is not None  # whether calls need a circuit breaker target
        self._exponential = tenacity.wait_exponential(multiplier=config.initial_delay_s, max=config.max_delay_s)
        self._budget_warned_at = -math.inf

    def refuse_if_open(self, vendor: str, base_url: str, model: str) -> None:
        """Raise ``CircuitOpen`` now, before a call reserves anything or is noted as a repeat,
        if its circuit is open."""
        if self._breakers is not None:
            self._breakers.refuse_if_open(circuit_target(vendor, base_url, model))

    def _tenacity_args(
        self, attempts: Attempts, started: float, retry_if: Callable[[BaseException], bool] | None = None
    ) -> dict[str, Any]:
        config = self.config
        verdicts: dict[int, Verdict] = {}

        def verdict_of(state: tenacity.RetryCallState) -> Verdict:
            verdict = verdicts.get(state.attempt_number)
            if verdict is None:
                assert state.outcome is not None
                exc = state.outcome.exception()
                assert exc is not None
                verdict = verdicts[state.attempt_number] = judge(exc)
            return verdict

        def retryable(state: tenacity.RetryCallState) -> bool:
            if state.outcome is None or not state.outcome.failed or not attempts.replayable or config.attempts <= 1:
                return False
            if retry_if is not None:
                exc = state.outcome.exception()
                return exc is not None and retry_if(exc)
            return verdict_of(state).retry

        def wait(state: tenacity.RetryCallState) -> float:
            asked = verdict_of(state).retry_after_s
            if asked is not None:
                return min(asked, config.max_delay_s)
            delay = float(self._exponential(state))
            return delay * (1 - 0.25 * random.random()) if config.jitter else delay

        def stop(state: tenacity.RetryCallState) -> bool:
            verdict = verdict_of(state)
            if state.attempt_number >= config.attempts:
                log.info("tokenguard: %s failed (%s) after %d attempts", attempts.what, verdict.reason, config.attempts)
                return True
            if config.deadline_s is not None:
                left = config.deadline_s - (self._clock() - started)
                asked = verdict.retry_after_s
                if (asked is not None and asked > left) or state.upcoming_sleep >= left:
                    log.info(
                        "tokenguard: %s failed (%s); not retried: %.1fs left of the %gs deadline, the wait is %.1fs",
                        attempts.what,
                        verdict.reason,
                        max(left, 0.0),
                        config.deadline_s,
                        asked if asked is not None else state.upcoming_sleep,
                    )
                    return True
            if self._breakers is not None and self._breakers.is_open(attempts.target):
                log.info("tokenguard: %s failed (%s); not retried: its circuit is open", attempts.what, verdict.reason)
                return True
            if self._budget is not None and not self._budget.take():
                now = self._clock()
                if now - self._budget_warned_at >= config.retry_budget_window_s:
                    self._budget_warned_at = now
                    log.warning(
                        "tokenguard: retry budget spent (%g of calls over %gs): failing %s at once (%s)",
                        config.retry_budget,
                        config.retry_budget_window_s,
                        attempts.what,
                        verdict.reason,
                    )
                return True
            return False

        def before_sleep(state: tenacity.RetryCallState) -> None:
            verdict = verdict_of(state)
            assert state.outcome is not None
            exc = state.outcome.exception()
            assert exc is not None
            log.info(
                "tokenguard: %s failed (%s); retry %d of %d in %.2fs",
                attempts.what,
                verdict.reason,
                state.attempt_number,
                config.attempts - 1,
                state.upcoming_sleep,
            )
            attempts.after_failure(exc, verdict)

        return {"retry": retryable, "wait": wait, "stop": stop, "before_sleep": before_sleep, "reraise": True}

    def _left(self, started: float) -> float | None:
        if self.config.deadline_s is None:
            return None
        return max(self.config.deadline_s - (self._clock() - started), 0.0)

    def _start_attempt(self, attempts: Attempts, number: int, started: float) -> float | None:
        if self._breakers is not None:
            self._breakers.admit(attempts.target)
        left = self._left(started)
        try:
            attempts.before_attempt(number, left)
        except BaseException:
            if self._breakers is not None:  # not sent: a half-open trial slot must not stay taken
                self._breakers.released(attempts.target)
            raise
        return left

    def _end_attempt(self, attempts: Attempts, exc: BaseException | None) -> None:
        if self._breakers is None:
            return
        if exc is None:
            self._breakers.succeeded(attempts.target)
            return
        verdict = judge(exc)
        if verdict.upstream:
            self._breakers.failed(attempts.target, type(exc).__name__)
        else:
            self._breakers.released(attempts.target)

    def _first(self, attempts: Attempts, started: float) -> float | None:
        if self._budget is not None:
            self._budget.note_call()
        return self._start_attempt(attempts, 1, started)

    def run(
        self,
        attempts: Attempts,
        send: Callable[[int, float | None], T],
        *,
        retry_if: Callable[[BaseException], bool] | None = None,
    ) -> T:
        """Send (``send(attempt_number, seconds_left)``) until it succeeds or the policy gives
        up; the last error is raised as it was.

        The first attempt runs outside tenacity (most calls succeed at once, and tenacity's
        per-call machinery costs about a tenth of an in-process call); a failed first attempt
        is handed to tenacity as its attempt 1, and tenacity decides everything after it.
        """
        started = self._clock()
        left = self._first(attempts, started)
        try:
            result = send(1, left)
        except BaseException as exc:
            self._end_attempt(attempts, exc)
            first = exc
        else:
            self._end_attempt(attempts, None)
            return result
        for attempt in tenacity.Retrying(sleep=time.sleep, **self._tenacity_args(attempts, started, retry_if)):
            with attempt:
                number = attempt.retry_state.attempt_number
                if number == 1:
                    raise first
                left = self._start_attempt(attempts, number, started)
                try:
                    result = send(number, left)
                except BaseException as exc:
                    self._end_attempt(attempts, exc)
                    raise
                self._end_attempt(attempts, None)
                return result
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    async def run_async(
        self,
        attempts: Attempts,
        send: Callable[[int, float | None], Awaitable[T]],
        *,
        retry_if: Callable[[BaseException], bool] | None = None,
    ) -> T:
        """``run`` for asyncio: sleeps with ``asyncio.sleep`` (cancellable at any point)."""
        started = self._clock()
        left = self._first(attempts, started)
        try:
            result = await send(1, left)
        except BaseException as exc:
            self._end_attempt(attempts, exc)
            first = exc
        else:
            self._end_attempt(attempts, None)
            return result
        async for attempt in tenacity.AsyncRetrying(**self._tenacity_args(attempts, started, retry_if)):
            with attempt:
                number = attempt.retry_state.attempt_number
                if number == 1:
                    raise first
                left = self._start_attempt(attempts, number, started)
                try:
                    result = await send(number, left)
                except BaseException as exc:
                    self._end_attempt(attempts, exc)
                    raise
                self._end_attempt(attempts, None)
                return result
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover
