"""pytest plugin: test an application that uses tokenguard, with no network and no API key.

Loaded automatically through the ``pytest11`` entry point once tokenguard is installed
(turn it off with ``-p no:tokenguard``). Nothing happens unless a test asks for one of
its fixtures; every fixture name starts with ``tokenguard_`` so that none can clash with
an application's own:

- ``tokenguard_guard``: a fresh in-memory ``Guard`` for the test, installed as the process
  default guard (``tokenguard.default_guard()``) and restored afterwards. Settling is
  synchronous and retries wait a millisecond or so. ``@pytest.mark.tokenguard(...)``
  passes ``Guard`` keyword arguments (``budgets=``, ``cache=``, ``loops=``, ``retry=``,
  ``clock=`` ...).
- ``tokenguard_fake``: a ``tokenguard.testing.FakeLLM``, the fake OpenAI and Anthropic API.
- ``tokenguard_openai`` / ``tokenguard_anthropic`` / ``tokenguard_async_openai`` /
  ``tokenguard_async_anthropic``: guarded clients on the fake, bound to the test's guard.
- ``tokenguard_harness``: all of the above in one object, plus assertion helpers
  (``assert_spent``, ``assert_calls``, ``assert_blocked``, ``assert_cache_hits``,
  ``assert_retries``, ``assert_sent``), and, while the test runs, every request the
  application's own clients send to the vendors' hosts answered by the fake (``intercept``).

See docs/testing.md.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Final

import pytest

# This module imports only pytest and the standard library; tokenguard's modules are
# imported by the fixtures that use them. (Importing ``tokenguard.pytest_plugin`` runs
# ``tokenguard/__init__.py``, which loads its names on first use; a fixture's ``Guard`` then
# imports both vendor SDKs.)
if TYPE_CHECKING:
    from tokenguard import Anthropic as GuardedAnthropic
    from tokenguard import AsyncAnthropic, AsyncOpenAI, Guard, LedgerRow, Retry, Stats
    from tokenguard import OpenAI as GuardedOpenAI
    from tokenguard.testing import ErrorReply, FakeLLM, Recorded, Reply

__all__ = ["DEFAULT_HOSTS", "FAKE_KEYS", "TokenguardHarness", "fast_retry", "intercept"]

MARKER: Final = "tokenguard"

# hosts whose requests ``intercept`` answers from the fake ("*." matches any subdomain)
DEFAULT_HOSTS: Final = ("api.openai.com", "api.anthropic.com", "*.openai.azure.com")

# environment variables naming more hosts to intercept (their URL's host is added)
_HOST_ENV: Final = ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "AZURE_OPENAI_ENDPOINT")

# the credentials ``intercept`` puts in the environment, so that ``OpenAI()`` can be built
FAKE_KEYS: Final[Mapping[str, str]] = {
    "OPENAI_API_KEY": "sk-fake-test-key",
    "AZURE_OPENAI_API_KEY": "sk-fake-test-key",
    "ANTHROPIC_API_KEY": "sk-ant-fake-test-key",
}

# marker arguments that configure the plugin rather than the Guard
_PLUGIN_OPTIONS: Final = frozenset({"intercept", "intercept_hosts"})

_MAX_ROWS_SHOWN: Final = 20


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``tokenguard`` marker (so that ``--strict-markers`` accepts it)."""
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**kwargs): tokenguard.Guard keyword arguments for the test's guard (tokenguard_guard): "
        "budgets=, cache=, loops=, retry=, store=, clock= ...; plus intercept=False / intercept_hosts=[...] "
        "for tokenguard_harness. See docs/testing.md.",
    )


# -- the guard ---------------------------------------------------------------------------------


def fast_retry() -> Retry:
    """The test guard's default retry: ``tokenguard.Retry()``'s 4 attempts and classification,
    but waits of 1-10 ms (a server's ``Retry-After`` included), no jitter and no retry budget,
    so that a scripted 429 costs a test milliseconds and never depends on earlier tests."""
    from tokenguard import Retry

    return Retry(attempts=4, initial_delay_s=0.001, max_delay_s=0.01, jitter=False, retry_budget=None)


def _marker_kwargs(node: pytest.Item) -> dict[str, Any]:
    """The ``@pytest.mark.tokenguard(...)`` keyword arguments that apply to a test: the
    markers of its module, class and function merged, the closest one winning."""
    merged: dict[str, Any] = {}
    for mark in reversed(list(node.iter_markers(MARKER))):
        if mark.args:
            pytest.fail(
                f"@pytest.mark.{MARKER} takes keyword arguments only (Guard settings), got {mark.args!r}",
                pytrace=False,
            )
        merged.update(mark.kwargs)
    return merged


def _guard_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the test's guard: test defaults, then the marker's.

    ``cache=True`` means an in-memory cache (the default ``Cache()`` lives on disk in the
    user's cache directory, and would carry answers from one test run into the next);
    ``retry=True`` means ``fast_retry()``.
    """
    from tokenguard import Cache

    kwargs: dict[str, Any] = {"store": "memory://", "settle_delay_s": 0, "retry": fast_retry()}
    kwargs.update({k: v for k, v in options.items() if k not in _PLUGIN_OPTIONS})
    if kwargs.get("cache") is True:
        kwargs["cache"] = Cache("memory")
    if kwargs.get("retry") is True:
        kwargs["retry"] = fast_retry()
    return kwargs


@pytest.fixture
def tokenguard_guard(request: pytest.FixtureRequest) -> Iterator[Guard]:
    """A fresh ``tokenguard.Guard`` for this test, installed as the process default guard.

    In-memory ledger (``store="memory://"``), calls settled before they return
    (``settle_delay_s=0``), ``fast_retry()``; no budgets, cache or loop detector unless
    ``@pytest.mark.tokenguard(budgets=[...], cache=True, loops=True, ...)`` asks (any
    ``Guard`` keyword argument; ``cache=True`` is an in-memory cache). Every client built
    without ``guard=`` (``tokenguard.OpenAI()``, wherever and whenever it was built)
    reports to it during the test; afterwards the previous default guard is restored and
    this one closed.
    """
    import tokenguard

    try:
        guard = tokenguard.Guard(**_guard_kwargs(_marker_kwargs(request.node)))
    except (TypeError, ValueError) as err:
        pytest.fail(f"@pytest.mark.{MARKER}(...): {err}", pytrace=False)
    previous = tokenguard.set_default_guard(guard)  # the one in place (None: not built yet)
    try:
        yield guard
    finally:
        tokenguard.set_default_guard(previous)
        guard.close()


# -- the fake and its clients ------------------------------------------------------------------


@pytest.fixture
def tokenguard_fake() -> FakeLLM:
    """A ``tokenguard.testing.FakeLLM``: the fake OpenAI and Anthropic API for this test.

    Script it with ``.queue(Reply(...), ErrorReply(...))``, ``.reply(**fields)``,
    ``.fail(status, headers=...)``; every other request gets ``.default``
    (``Reply()``: 9 input and 5 output tokens). ``.money_requests`` lists what reached it.
    """
    from tokenguard.testing import FakeLLM

    return FakeLLM()


@pytest.fixture
def tokenguard_openai(tokenguard_fake: FakeLLM, tokenguard_guard: Guard) -> Iterator[GuardedOpenAI]:
    """A ``tokenguard.OpenAI`` talking to ``tokenguard_fake``, guarded by ``tokenguard_guard``."""
    client: GuardedOpenAI = tokenguard_fake.openai(guard=tokenguard_guard)
    yield client
    client.close()


@pytest.fixture
def tokenguard_anthropic(tokenguard_fake: FakeLLM, tokenguard_guard: Guard) -> Iterator[GuardedAnthropic]:
    """A ``tokenguard.Anthropic`` talking to ``tokenguard_fake``, guarded by ``tokenguard_guard``."""
    client: GuardedAnthropic = tokenguard_fake.anthropic(guard=tokenguard_guard)
    yield client
    client.close()


@pytest.fixture
def tokenguard_async_openai(tokenguard_fake: FakeLLM, tokenguard_guard: Guard) -> AsyncOpenAI:
    """A ``tokenguard.AsyncOpenAI`` talking to ``tokenguard_fake``, guarded by ``tokenguard_guard``."""
    client: AsyncOpenAI = tokenguard_fake.openai(guard=tokenguard_guard, async_=True)
    return client


@pytest.fixture
def tokenguard_async_anthropic(tokenguard_fake: FakeLLM, tokenguard_guard: Guard) -> AsyncAnthropic:
    """A ``tokenguard.AsyncAnthropic`` talking to ``tokenguard_fake``, guarded by ``tokenguard_guard``."""
    client: AsyncAnthropic = tokenguard_fake.anthropic(guard=tokenguard_guard, async_=True)
    return client


# -- the application's own clients -------------------------------------------------------------


def _host_patterns(hosts: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...], bool]:
    """Exact hosts, ``"*."`` suffixes, and whether ``"*"`` (every host) was asked for."""
    exact: set[str] = set()
    suffixes: list[str] = []
    everything = False
    for host in hosts:
        host = host.strip().lower()
        if host == "*":
            everything = True
        elif host.startswith("*."):
            suffixes.append(host[1:])
        elif host:
            exact.add(host)
    return frozenset(exact), tuple(suffixes), everything


def _env_hosts() -> list[str]:
    import httpx2

    hosts = []
    for name in _HOST_ENV:
        value = os.environ.get(name)
        if value:
            try:
                host = httpx2.URL(value).host
            except Exception:  # a malformed URL: the SDK will say so when it is used
                continue
            if host:
                hosts.append(host)
    return hosts


@contextmanager
def intercept(fake: FakeLLM, hosts: Iterable[str] = (), *, keys: bool = True) -> Iterator[FakeLLM]:
    """Answer from ``fake`` every HTTP request sent to a vendor's host while the block runs.

    This is what lets a test drive an application that builds its own clients
    (``tokenguard.OpenAI()``, ``tokenguard.wrap(anthropic.Anthropic())``, even a plain
    ``openai.OpenAI()``), at import time or deep in its code, with the real base URLs.
    Exactly two things are patched, and restored on exit:

    - ``httpx2.HTTPTransport.handle_request`` and
      ``httpx2.AsyncHTTPTransport.handle_async_request`` (the default transports of every
      ``httpx2`` client, the SDKs' own included): a request whose host is one of
      ``DEFAULT_HOSTS`` (``api.openai.com``, ``api.anthropic.com``, ``*.openai.azure.com``),
      the host of ``OPENAI_BASE_URL`` / ``ANTHROPIC_BASE_URL`` / ``AZURE_OPENAI_ENDPOINT`` if
      set, or one of ``hosts`` (``"*.example.com"`` matches subdomains, ``"*"`` every host)
      is answered by ``fake``; every other request goes out as usual.
    - with ``keys=True``, the environment variables in ``FAKE_KEYS`` (``OPENAI_API_KEY``,
      ``AZURE_OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``) are set to fake keys, so that a client
      built without ``api_key=`` can be built, and a real key is never sent anywhere.

    Not intercepted: a client given an ``http_client`` with a transport of its own (not
    ``httpx2``'s default one), such as ``DefaultAioHttpClient``.
    """
    import httpx2

    exact, suffixes, everything = _host_patterns([*DEFAULT_HOSTS, *_env_hosts(), *hosts])

    def wanted(url: httpx2.URL) -> bool:
        host = url.host.lower()
        return everything or host in exact or host.endswith(suffixes)

    sync_fake = fake.transport()
    async_fake = fake.transport(async_=True)
    sync_cls, async_cls = httpx2.HTTPTransport, httpx2.AsyncHTTPTransport
    sync_original = vars(sync_cls)["handle_request"]
    async_original = vars(async_cls)["handle_async_request"]

    def handle_request(self: httpx2.HTTPTransport, request: httpx2.Request) -> httpx2.Response:
        if wanted(request.url):
            return sync_fake.handle_request(request)
        response: httpx2.Response = sync_original(self, request)
        return response

    async def handle_async_request(self: httpx2.AsyncHTTPTransport, request: httpx2.Request) -> httpx2.Response:
        if wanted(request.url):
            return await async_fake.handle_async_request(request)
        response: httpx2.Response = await async_original(self, request)
        return response

    saved_env = {name: os.environ.get(name) for name in FAKE_KEYS} if keys else {}
    setattr(sync_cls, "handle_request", handle_request)  # noqa: B010
    setattr(async_cls, "handle_async_request", handle_async_request)  # noqa: B010
    try:
        if keys:
            os.environ.update(FAKE_KEYS)
        yield fake
    finally:
        setattr(sync_cls, "handle_request", sync_original)  # noqa: B010
        setattr(async_cls, "handle_async_request", async_original)  # noqa: B010
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- the harness -------------------------------------------------------------------------------


def _usd(value: Decimal | str | int | float) -> Decimal:
    """An expected amount as a ``Decimal`` (a float is read as the decimal it prints as)."""
    if isinstance(value, bool):
        raise TypeError(f"expected an amount in USD (Decimal, str, int or float), got {value!r}")
    if isinstance(value, Decimal):
        return value
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, int | str):
        try:
            return Decimal(value)
        except InvalidOperation:
            raise ValueError(f"not an amount in USD: {value!r}") from None
    raise TypeError(f"expected an amount in USD (Decimal, str, int or float), got {value!r}")


def _money(amount: Decimal | None) -> str:
    if amount is None:
        return "-"
    return "$" + format(amount.normalize(), "f")


def _scope_text(scope: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in scope.items())


def _for(scope: Mapping[str, object], *extra: str) -> str:
    parts = [p for p in (*extra, _scope_text(scope)) if p]
    return f" ({'; '.join(parts)})" if parts else ""


def _row_line(number: int, row: LedgerRow) -> str:
    what = row.outcome + (f":{row.error}" if row.error else "")
    scope = _scope_text(row.scope) or "-"
    flags = " estimated" if row.estimated else ""
    return (
        f"  {number:>3}. {what:<22} {row.vendor} {row.endpoint} {row.model}  [{scope}]  "
        f"{_money(row.cost_usd)}  attempts={row.attempts}{flags}"
    )


class TokenguardHarness:
    """The ``tokenguard_harness`` fixture: the test's guard and fake API, guarded clients on the
    fake, and assertions about what the application spent, sent, and was refused.

    Every read settles the calls still queued first (``guard.flush()``). Scope keyword
    arguments (``user="alice"``) filter the ledger rows like ``guard.stats(**scope)`` does:
    a row matches when it has every attribute given, with that value.
    """

    def __init__(self, guard: Guard, fake: FakeLLM) -> None:
        self.guard = guard
        self.fake = fake

    # -- guarded clients on the fake (built on first use, closed after the test) --------------

    @functools.cached_property
    def openai(self) -> GuardedOpenAI:
        """A ``tokenguard.OpenAI`` on the fake, guarded by ``self.guard``."""
        client: GuardedOpenAI = self.fake.openai(guard=self.guard)
        return client

    @functools.cached_property
    def anthropic(self) -> GuardedAnthropic:
        """A ``tokenguard.Anthropic`` on the fake, guarded by ``self.guard``."""
        client: GuardedAnthropic = self.fake.anthropic(guard=self.guard)
        return client

    @functools.cached_property
    def async_openai(self) -> AsyncOpenAI:
        """A ``tokenguard.AsyncOpenAI`` on the fake, guarded by ``self.guard``."""
        client: AsyncOpenAI = self.fake.openai(guard=self.guard, async_=True)
        return client

    @functools.cached_property
    def async_anthropic(self) -> AsyncAnthropic:
        """A ``tokenguard.AsyncAnthropic`` on the fake, guarded by ``self.guard``."""
        client: AsyncAnthropic = self.fake.anthropic(guard=self.guard, async_=True)
        return client

    def _close(self) -> None:
        for name in ("openai", "anthropic"):
            client = self.__dict__.get(name)
            if client is not None:
                client.close()

    # -- scripting the fake ---------------------------------------------------------------------

    def queue(self, *replies: Reply | ErrorReply | BaseException) -> TokenguardHarness:
        """Answer the next money-spending requests with these, in order (``FakeLLM.queue``)."""
        self.fake.queue(*replies)
        return self

    def reply(self, **fields: Any) -> TokenguardHarness:
        """Answer the next money-spending request with ``Reply(**fields)``: ``reply(input_tokens=100_000)``."""
        self.fake.reply(**fields)
        return self

    def fail(
        self,
        status: int,
        *,
        message: str = "fake error",
        headers: Mapping[str, str] | None = None,
        error_type: str | None = None,
        times: int = 1,
    ) -> TokenguardHarness:
        """Answer the next ``times`` money-spending requests with an HTTP error: ``fail(429)``."""
        self.fake.fail(status, message=message, headers=headers, error_type=error_type, times=times)
        return self

    # -- reading --------------------------------------------------------------------------------

    def stats(self, **scope: str | int) -> Stats:
        """``guard.stats(**scope)``: totals over the matching ledger rows."""
        self.guard.flush()
        return self.guard.stats(**scope)

    def rows(self, **scope: str | int) -> list[LedgerRow]:
        """The matching ledger rows, oldest first."""
        self.guard.flush()
        return list(self.guard.store.rows(scope={k: str(v) for k, v in scope.items()}))

    def spent(self, period: str = "total", **scope: str | int) -> Decimal:
        """``guard.spent(period, **scope)``: settled USD of the matching calls."""
        self.guard.flush()
        return self.guard.spent(period, **scope)

    @property
    def sent(self) -> list[Recorded]:
        """The money-spending requests that reached the fake API (each retry attempt is one)."""
        return self.fake.money_requests

    # -- assertions -----------------------------------------------------------------------------

    def assert_spent(self, usd: Decimal | str | int | float, /, *, period: str = "total", **scope: str | int) -> None:
        """Assert the matching calls cost exactly ``usd`` in ``period`` (default: all time).

        ``usd`` is compared as a ``Decimal``, exactly: ``"0.00000435"``, ``Decimal("0.01")``,
        ``0`` (a float is read as the decimal it prints as). A cache hit and a refused call cost $0.
        """
        __tracebackhide__ = True
        expected = _usd(usd)
        actual = self.spent(period, **scope)
        if actual != expected:
            self._fail(f"expected {_money(expected)} spent{_for(scope, period)}, got {_money(actual)}")

    def assert_calls(self, n: int, /, **scope: str | int) -> None:
        """Assert ``n`` calls were recorded (every ledger row: answered, failed, cache hits and
        refused calls alike; a retried call is one call)."""
        __tracebackhide__ = True
        actual = self.stats(**scope).calls
        if actual != n:
            self._fail(f"expected {n} call(s) recorded{_for(scope)}, got {actual}")

    def assert_blocked(self, n: int | None = None, reason: str | None = None, **scope: str | int) -> None:
        """Assert calls were refused before they were sent: exactly ``n`` (``None``: at least one),
        for ``reason`` if given (``"budget"``, ``"loop"``, ``"unpriced"``, ``"circuit_open"``)."""
        __tracebackhide__ = True
        blocked = [r for r in self.rows(**scope) if r.outcome == "blocked"]
        matching = [r for r in blocked if reason is None or r.error == reason]
        if (n is None and matching) or len(matching) == n:
            return
        want = "at least 1" if n is None else str(n)
        why = f" for {reason!r}" if reason else ""
        seen = ", ".join(sorted({str(r.error) for r in blocked})) or "none"
        self._fail(f"expected {want} call(s) blocked{why}{_for(scope)}, got {len(matching)} (reasons seen: {seen})")

    def assert_cache_hits(self, n: int, /, **scope: str | int) -> None:
        """Assert ``n`` calls were answered from the response cache (each at $0)."""
        __tracebackhide__ = True
        actual = self.stats(**scope).cache_hits
        if actual != n:
            hint = (
                ""
                if self.guard.cache is not None
                else " (this guard has no cache: @pytest.mark.tokenguard(cache=True))"
            )
            self._fail(f"expected {n} cache hit(s){_for(scope)}, got {actual}{hint}")

    def assert_retries(self, n: int, /, **scope: str | int) -> None:
        """Assert ``n`` retries in all (attempts beyond each call's first)."""
        __tracebackhide__ = True
        actual = self.stats(**scope).retries
        if actual != n:
            hint = "" if self.guard.retry is not None else " (this guard does not retry: retry=False)"
            self._fail(f"expected {n} retr{'y' if n == 1 else 'ies'}{_for(scope)}, got {actual}{hint}")

    def assert_sent(self, n: int, /) -> None:
        """Assert ``n`` money-spending requests reached the fake API (each attempt of a retried
        call is one; cache hits and refused calls send none)."""
        __tracebackhide__ = True
        actual = len(self.sent)
        if actual != n:
            self._fail(f"expected {n} request(s) to reach the fake API, got {actual}")

    # -- failure messages -----------------------------------------------------------------------

    def _fail(self, headline: str) -> None:
        __tracebackhide__ = True
        raise AssertionError(f"tokenguard: {headline}\n{self.describe()}")

    def describe(self) -> str:
        """The ledger and the fake API's traffic so far, as assertion messages show them."""
        rows = self.rows()
        lines = [f"ledger: {len(rows)} call(s), {_money(sum((r.cost_usd or Decimal(0) for r in rows), Decimal(0)))}"]
        shown = rows[-_MAX_ROWS_SHOWN:]
        if len(rows) > len(shown):
            lines.append(f"  ... {len(rows) - len(shown)} earlier row(s) not shown")
        first = len(rows) - len(shown) + 1
        lines += [_row_line(first + i, row) for i, row in enumerate(shown)]
        sent = len(self.sent)
        lines.append(f"fake API: {sent} money-spending request(s) received")
        attempts = sum(r.attempts for r in rows)
        if sent > attempts:
            lines.append(
                f"  note: {sent - attempts} of them are in no ledger row of this test's guard: a client "
                "that is not guarded (a plain openai.OpenAI / anthropic.Anthropic), or one given another guard="
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<TokenguardHarness guard={self.guard!r}>"


@pytest.fixture
def tokenguard_harness(
    request: pytest.FixtureRequest, tokenguard_guard: Guard, tokenguard_fake: FakeLLM
) -> Iterator[TokenguardHarness]:
    """The test's guard (``tokenguard_guard``) and fake API (``tokenguard_fake``) with assertion
    helpers, and the application's own clients pointed at the fake.

    While the test runs, every request to ``api.openai.com``, ``api.anthropic.com``,
    ``*.openai.azure.com`` (and the hosts of ``OPENAI_BASE_URL`` / ``ANTHROPIC_BASE_URL`` /
    ``AZURE_OPENAI_ENDPOINT``) is answered by the fake, and ``OPENAI_API_KEY`` /
    ``AZURE_OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY`` hold fake keys (see ``intercept``).
    ``@pytest.mark.tokenguard(intercept_hosts=["llm-proxy.internal"])`` adds hosts;
    ``intercept=False`` turns this off.
    """
    options = _marker_kwargs(request.node)
    harness = TokenguardHarness(tokenguard_guard, tokenguard_fake)
    try:
        if options.get("intercept", True):
            hosts = options.get("intercept_hosts", ())
            if isinstance(hosts, str):
                hosts = (hosts,)
            with intercept(tokenguard_fake, hosts):
                yield harness
        else:
            yield harness
    finally:
        harness._close()
