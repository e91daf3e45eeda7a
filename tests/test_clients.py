"""The guarded clients as drop-in replacements: types, constructor arguments, vendor errors,
free endpoints, attribution, the default guard, secrets, unpriced models, spend queries and
a failing store."""

from __future__ import annotations

import asyncio
import inspect
import threading
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletion

import tokenguard
import tokenguard._pipeline
from tokenguard.stores import MemoryStore
from tokenguard.testing import FakeLLM, Reply

MSGS = [{"role": "user", "content": "Say hi."}]
OA = "gpt-4o"
AN = "claude-haiku-4-5"
AZURE = {"azure_endpoint": "http://fake-azure.test", "api_version": "2024-10-21"}


def rows(guard: tokenguard.Guard) -> list[tokenguard.LedgerRow]:
    return list(guard.store.rows())


def only_row(guard: tokenguard.Guard) -> tokenguard.LedgerRow:
    got = rows(guard)
    assert len(got) == 1, got
    return got[0]


def is_anthropic(client: Any) -> bool:
    return isinstance(client, anthropic.Anthropic | anthropic.AsyncAnthropic)


def spend(client: Any, **kw: Any) -> Any:
    """One money-spending call (a coroutine for an async client)."""
    if is_anthropic(client):
        return client.messages.create(model=AN, max_tokens=100, messages=MSGS, **kw)
    return client.chat.completions.create(model=OA, messages=MSGS, **kw)


async def resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# -- 1. types and wrap() ------------------------------------------------------------------------

GUARDED = [
    pytest.param(tokenguard.OpenAI, openai.OpenAI, {"async_": False}, id="OpenAI"),
    pytest.param(tokenguard.AsyncOpenAI, openai.AsyncOpenAI, {"async_": True}, id="AsyncOpenAI"),
    pytest.param(tokenguard.AzureOpenAI, openai.AzureOpenAI, {"async_": False, "azure": True}, id="AzureOpenAI"),
    pytest.param(
        tokenguard.AsyncAzureOpenAI, openai.AsyncAzureOpenAI, {"async_": True, "azure": True}, id="AsyncAzureOpenAI"
    ),
    pytest.param(tokenguard.Anthropic, anthropic.Anthropic, {"async_": False}, id="Anthropic"),
    pytest.param(tokenguard.AsyncAnthropic, anthropic.AsyncAnthropic, {"async_": True}, id="AsyncAnthropic"),
]


@pytest.mark.parametrize(("guarded_cls", "vendor_cls", "kw"), GUARDED)
def test_guarded_class_is_instance_of_vendor_class(
    fake: FakeLLM, guard: tokenguard.Guard, guarded_cls: type, vendor_cls: type, kw: dict[str, Any]
) -> None:
    """Each tokenguard client is an instance of (and a subclass of) its vendor class."""
    factory = fake.anthropic if issubclass(vendor_cls, anthropic.Anthropic | anthropic.AsyncAnthropic) else fake.openai
    client = factory(guard=guard, **kw)
    assert type(client) is guarded_cls
    assert isinstance(client, vendor_cls)
    assert issubclass(guarded_cls, vendor_cls)


class MyOpenAI(openai.OpenAI):
    """A user's own subclass of the vendor client."""

    def greeting(self) -> str:
        return "hello from a subclass"


def _vendor_clients(fake: FakeLLM) -> dict[str, Callable[[], Any]]:
    return {
        "OpenAI": lambda: fake.vendor_openai(),
        "AsyncOpenAI": lambda: fake.vendor_openai(async_=True),
        "AzureOpenAI": lambda: openai.AzureOpenAI(api_key="sk-az", http_client=fake.http_client(), **AZURE),
        "AsyncAzureOpenAI": lambda: openai.AsyncAzureOpenAI(
            api_key="sk-az", http_client=fake.http_client(async_=True), **AZURE
        ),
        "Anthropic": lambda: fake.vendor_anthropic(),
        "AsyncAnthropic": lambda: fake.vendor_anthropic(async_=True),
        "MyOpenAI": lambda: MyOpenAI(
            api_key="sk-my", base_url="http://fake-openai.test/v1", http_client=fake.http_client()
        ),
    }


VENDOR_NAMES = ["OpenAI", "AsyncOpenAI", "AzureOpenAI", "AsyncAzureOpenAI", "Anthropic", "AsyncAnthropic", "MyOpenAI"]


@pytest.mark.parametrize("name", VENDOR_NAMES)
def test_wrap_keeps_the_clients_type(fake: FakeLLM, guard: tokenguard.Guard, name: str) -> None:
    """wrap(c) is an instance of type(c), for every vendor class and a user subclass."""
    original = _vendor_clients(fake)[name]()
    wrapped = tokenguard.wrap(original, guard=guard)
    assert isinstance(wrapped, type(original))
    assert wrapped is not original
    assert wrapped.guard is guard


@pytest.mark.parametrize("name", VENDOR_NAMES)
async def test_wrap_records_and_leaves_the_original_unguarded(
    fake: FakeLLM, guard: tokenguard.Guard, name: str
) -> None:
    """Calls through the original add no ledger row; calls through the wrapped client add one."""
    original = _vendor_clients(fake)[name]()
    original_type = type(original)
    wrapped = tokenguard.wrap(original, guard=guard)
    await resolve(spend(original))
    assert rows(guard) == []
    assert type(original) is original_type
    await resolve(spend(wrapped))
    assert len(rows(guard)) == 1
    assert len(fake.money_requests) == 2


def test_wrap_keeps_a_user_subclass_methods(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """A wrapped user subclass keeps its own methods."""
    wrapped = tokenguard.wrap(_vendor_clients(fake)["MyOpenAI"](), guard=guard)
    assert wrapped.greeting() == "hello from a subclass"


def test_wrap_keeps_the_original_settings(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """The wrapped copy keeps the original's key, base URL, timeout and headers."""
    original = fake.vendor_openai(timeout=7.5, default_headers={"X-Origin": "wrapped"})
    wrapped = tokenguard.wrap(original, guard=guard)
    assert wrapped.api_key == original.api_key
    assert wrapped.base_url == original.base_url
    assert wrapped.timeout == 7.5
    spend(wrapped)
    assert fake.requests[-1].headers["x-origin"] == "wrapped"


def test_wrap_twice_records_once_per_call(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """Wrapping an already wrapped client works, keeps the guard and records each call once."""
    original = fake.vendor_openai()
    twice = tokenguard.wrap(tokenguard.wrap(original, guard=guard))
    assert isinstance(twice, openai.OpenAI)
    assert twice.guard is guard
    spend(twice)
    assert len(rows(guard)) == 1


def test_wrap_twice_with_a_new_guard_moves_the_records(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """Re-wrapping with another guard records into the new guard only."""
    other = tokenguard.Guard(store="memory://")
    rewrapped = tokenguard.wrap(tokenguard.wrap(fake.vendor_anthropic(), guard=guard), guard=other)
    spend(rewrapped)
    assert rows(guard) == []
    assert len(rows(other)) == 1


@pytest.mark.parametrize("thing", [object(), "sk-not-a-client", httpx2.Client()], ids=["object", "str", "httpx2"])
def test_wrap_of_a_non_client_raises_configuration_error(thing: object) -> None:
    """wrap() of anything but a vendor client raises ConfigurationError."""
    with pytest.raises(tokenguard.ConfigurationError):
        tokenguard.wrap(thing)


# -- 2. constructor arguments, with_options, copy -------------------------------------------------


def test_constructor_arguments_are_honoured(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """base_url, timeout, default_headers, organization and the user's http_client are all used."""
    sent: list[httpx2.Request] = []
    http = httpx2.Client(transport=fake.transport(), event_hooks={"request": [sent.append]})
    client = tokenguard.OpenAI(
        api_key="sk-ctor",
        base_url="http://fake-openai.test/custom/v1",
        timeout=12.5,
        default_headers={"X-Team": "search"},
        organization="org-123",
        http_client=http,
        guard=guard,
    )
    assert client.timeout == 12.5
    assert client.organization == "org-123"
    assert client.base_url == httpx2.URL("http://fake-openai.test/custom/v1/")
    spend(client)
    assert len(sent) == 1
    recorded = fake.requests[-1]
    assert recorded.path == "/custom/v1/chat/completions"
    assert recorded.headers["x-team"] == "search"
    assert recorded.headers["openai-organization"] == "org-123"
    assert len(rows(guard)) == 1


def test_anthropic_constructor_arguments_are_honoured(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """Anthropic's base_url, default_headers and http_client are used."""
    sent: list[httpx2.Request] = []
    http = httpx2.Client(transport=fake.transport(), event_hooks={"request": [sent.append]})
    client = tokenguard.Anthropic(
        api_key="sk-ant-ctor",
        base_url="http://fake-anthropic.test",
        timeout=9.0,
        default_headers={"X-Team": "ranking"},
        http_client=http,
        guard=guard,
    )
    assert client.timeout == 9.0
    spend(client)
    assert len(sent) == 1
    assert fake.requests[-1].headers["x-team"] == "ranking"
    assert len(rows(guard)) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda c: c,
        lambda c: c.with_options(max_retries=3),
        lambda c: c.copy(max_retries=4),
        lambda c: c.copy(),
        lambda c: c.with_options(timeout=3.0),
    ],
    ids=["constructor", "with_options", "copy-max_retries", "copy", "with_options-timeout"],
)
@pytest.mark.parametrize("vendor", ["openai", "anthropic"])
def test_vendor_retries_are_off(fake: FakeLLM, guard: tokenguard.Guard, vendor: str, make: Any) -> None:
    """max_retries is 0 even when 5 is passed, and stays 0 through with_options() and copy()."""
    factory = fake.openai if vendor == "openai" else fake.anthropic
    client = make(factory(guard=guard, max_retries=5))
    assert client.max_retries == 0


def test_with_options_retries_do_not_multiply_attempts(fake: FakeLLM) -> None:
    """A with_options(max_retries=3) copy of a max_retries=5 client sends a failing request
    exactly as often as tokenguard's Retry says: the SDK's retries stay off."""
    fake.fail(500, times=9)
    guard = tokenguard.Guard(store="memory://", retry=tokenguard.Retry(attempts=2, initial_delay_s=0.001))
    client = fake.openai(guard=guard, max_retries=5).with_options(max_retries=3)
    with pytest.raises(openai.InternalServerError):
        spend(client)
    assert len(fake.requests) == 2


@pytest.mark.parametrize("method", ["with_options", "copy"])
@pytest.mark.parametrize("kw", [{}, {"async_": True}, {"azure": True}], ids=["sync", "async", "azure"])
def test_copies_are_the_same_guarded_class_with_the_same_guard(
    fake: FakeLLM, guard: tokenguard.Guard, method: str, kw: dict[str, Any]
) -> None:
    """with_options()/copy() return the same guarded class, keeping the guard."""
    client = fake.openai(guard=guard, **kw)
    copied = getattr(client, method)(timeout=4.0)
    assert type(copied) is type(client)
    assert copied.guard is guard
    assert copied.timeout == 4.0


@pytest.mark.parametrize("method", ["with_options", "copy"])
def test_anthropic_copies_keep_class_and_guard(fake: FakeLLM, guard: tokenguard.Guard, method: str) -> None:
    """Anthropic with_options()/copy() return the same guarded class, keeping the guard."""
    client = fake.anthropic(guard=guard, async_=True)
    copied = getattr(client, method)(timeout=4.0)
    assert type(copied) is tokenguard.AsyncAnthropic
    assert copied.guard is guard


async def test_calls_through_a_copy_land_in_the_same_ledger(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """Calls through with_options() and copy() copies are recorded in the original guard's ledger."""
    client = fake.openai(guard=guard, async_=True)
    await spend(client.with_options(timeout=5.0))
    await spend(client.copy(default_headers={"X-Copy": "1"}))
    got = rows(guard)
    assert len(got) == 2
    assert {r.endpoint for r in got} == {"chat.completions"}
    assert fake.requests[-1].headers["x-copy"] == "1"


def test_openai_beta_calls_are_recorded(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """client.beta.chat.completions.parse() on a with_options copy is recorded."""
    fake.reply(text='{"a": 1}')
    client = fake.openai(guard=guard).with_options(timeout=5.0)
    client.beta.chat.completions.parse(model=OA, messages=MSGS, response_format={"type": "json_object"})
    row = only_row(guard)
    assert row.endpoint == "chat.completions"
    assert row.usage.input_tokens == 9


def test_anthropic_beta_calls_are_recorded(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """client.beta.messages.create() on a with_options copy is recorded."""
    client = fake.anthropic(guard=guard).with_options(timeout=5.0)
    client.beta.messages.create(model=AN, max_tokens=100, messages=MSGS, betas=["x-test"])
    row = only_row(guard)
    assert row.vendor == "anthropic"
    assert row.usage.output_tokens == 5


# -- 3. vendor errors -----------------------------------------------------------------------------

ERRORS = [
    pytest.param("openai", 400, {}, openai.BadRequestError, id="openai-400"),
    pytest.param("openai", 401, {}, openai.AuthenticationError, id="openai-401"),
    pytest.param("openai", 429, {"retry-after": "1"}, openai.RateLimitError, id="openai-429"),
    pytest.param("openai", 500, {}, openai.InternalServerError, id="openai-500"),
    pytest.param("anthropic", 429, {"retry-after": "1"}, anthropic.RateLimitError, id="anthropic-429"),
    pytest.param("anthropic", 529, {}, anthropic.OverloadedError, id="anthropic-529"),
    pytest.param("anthropic", 503, {}, anthropic.ServiceUnavailableError, id="anthropic-503"),
]


def _client(fake: FakeLLM, guard: tokenguard.Guard, vendor: str, async_: bool) -> Any:
    if vendor == "openai":
        return fake.openai(guard=guard, async_=async_)
    return fake.anthropic(guard=guard, async_=async_)


@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(("vendor", "status", "headers", "exc_cls"), ERRORS)
async def test_vendor_error_keeps_its_class_and_is_not_retried(
    fake: FakeLLM,
    guard: tokenguard.Guard,
    vendor: str,
    status: int,
    headers: dict[str, str],
    exc_cls: type[Exception],
    async_: bool,
) -> None:
    """An HTTP error reaches the caller as the vendor's class after exactly one request."""
    fake.fail(status, headers={"x-fake-server": "yes", **headers}, times=3)
    client = _client(fake, guard, vendor, async_)
    with pytest.raises(exc_cls) as info:
        await resolve(spend(client))
    assert type(info.value) is exc_cls
    assert not isinstance(info.value, tokenguard.TokenguardError)
    assert info.value.status_code == status  # type: ignore[attr-defined]
    assert len(fake.requests) == 1


@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(("vendor", "status", "headers", "exc_cls"), ERRORS)
async def test_vendor_error_is_recorded_as_an_unpriced_error_row(
    fake: FakeLLM,
    guard: tokenguard.Guard,
    vendor: str,
    status: int,
    headers: dict[str, str],
    exc_cls: type[Exception],
    async_: bool,
) -> None:
    """A failed call leaves one row: outcome "error", error = the exception's class name, cost 0."""
    fake.fail(status, headers=headers)
    with pytest.raises(exc_cls):
        await resolve(spend(_client(fake, guard, vendor, async_)))
    row = only_row(guard)
    assert row.outcome == "error"
    assert row.error == exc_cls.__name__
    assert row.cost_usd == 0
    assert row.vendor == vendor


@pytest.mark.parametrize(("vendor", "status", "headers", "exc_cls"), ERRORS)
def test_vendor_error_response_keeps_server_headers(
    fake: FakeLLM,
    guard: tokenguard.Guard,
    vendor: str,
    status: int,
    headers: dict[str, str],
    exc_cls: type[Exception],
) -> None:
    """The error's .response.headers still carry the server's headers (retry-after included)."""
    fake.fail(status, headers={"x-fake-server": "yes", **headers})
    with pytest.raises(exc_cls) as info:
        spend(_client(fake, guard, vendor, False))
    response = info.value.response  # type: ignore[attr-defined]
    assert response.headers["x-fake-server"] == "yes"
    for name, value in headers.items():
        assert response.headers[name] == value


@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("vendor", "exc_cls"),
    [("openai", openai.APIConnectionError), ("anthropic", anthropic.APIConnectionError)],
)
async def test_connection_error_keeps_the_vendor_class(
    fake: FakeLLM, guard: tokenguard.Guard, vendor: str, exc_cls: type[Exception], async_: bool
) -> None:
    """A transport ConnectError reaches the caller as the vendor's APIConnectionError, recorded at cost 0."""
    fake.queue(httpx2.ConnectError("boom"), httpx2.ConnectError("boom again"))
    with pytest.raises(exc_cls) as info:
        await resolve(spend(_client(fake, guard, vendor, async_)))
    assert type(info.value) is exc_cls
    assert len(fake.requests) == 1
    row = only_row(guard)
    assert (row.outcome, row.error, row.cost_usd) == ("error", exc_cls.__name__, 0)


# -- 4. free endpoints ----------------------------------------------------------------------------


def test_openai_models_list_is_free(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """openai models.list() reaches the server and adds no ledger row."""
    page = fake.openai(guard=guard).models.list()
    assert list(page) == []
    assert [(r.method, r.path) for r in fake.requests] == [("GET", "/v1/models")]
    assert rows(guard) == []


def test_openai_input_token_count_is_free(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """openai responses.input_tokens.count() passes through untouched with no ledger row."""
    counted = fake.openai(guard=guard).responses.input_tokens.count(model="gpt-5", input="hi")
    assert counted.input_tokens == 9
    assert fake.requests[-1].path == "/v1/responses/input_tokens"
    assert rows(guard) == []


async def test_anthropic_count_tokens_is_free(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """anthropic messages.count_tokens() passes through untouched with no ledger row."""
    counted = await fake.anthropic(guard=guard, async_=True).messages.count_tokens(model=AN, messages=MSGS)
    assert counted.input_tokens == 9
    assert fake.requests[-1].path == "/v1/messages/count_tokens"
    assert rows(guard) == []


def test_anthropic_models_list_is_free(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """anthropic models.list() passes through untouched with no ledger row."""
    page = fake.anthropic(guard=guard).models.list()
    assert list(page) == []
    assert fake.requests[-1].path == "/v1/models"
    assert rows(guard) == []


# -- 5. attribution -------------------------------------------------------------------------------


def test_scope_labels_the_row(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """A call inside scope(user=..., project=...) carries that scope in its row."""
    with tokenguard.scope(user="alice", project="x"):
        spend(fake.openai(guard=guard))
    assert dict(only_row(guard).scope) == {"user": "alice", "project": "x"}


def test_call_outside_any_scope_has_an_empty_scope(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """A call outside every scope, after one closed, has an empty scope."""
    client = fake.anthropic(guard=guard)
    with tokenguard.scope(user="alice"):
        pass
    spend(client)
    assert dict(only_row(guard).scope) == {}


def test_nested_scopes_merge_and_override(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """An inner scope adds to and overrides the outer one; leaving it restores the outer scope."""
    client = fake.openai(guard=guard)
    with tokenguard.scope(user="alice", project="x"):
        with tokenguard.scope(project="y", team="search"):
            spend(client)
        spend(client)
    inner, outer = rows(guard)
    assert dict(inner.scope) == {"user": "alice", "project": "y", "team": "search"}
    assert dict(outer.scope) == {"user": "alice", "project": "x"}


async def test_concurrent_tasks_keep_their_own_scope(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """Two asyncio tasks in different scopes sharing one AsyncOpenAI each label their own rows."""
    client = fake.openai(guard=guard, async_=True)

    async def work(user: str, calls: int) -> None:
        async with tokenguard.scope(user=user, project=f"p-{user}"):
            for _ in range(calls):
                await spend(client)

    await asyncio.gather(work("alice", 3), work("bob", 4))
    got = rows(guard)
    assert Counter(r.scope["user"] for r in got) == {"alice": 3, "bob": 4}
    assert all(r.scope["project"] == f"p-{r.scope['user']}" for r in got)


def test_threads_keep_their_own_scope(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """Eight threads, each in its own scope, label their rows with their own user."""
    client = fake.openai(guard=guard)
    start = threading.Barrier(8)

    def work(i: int) -> None:
        with tokenguard.scope(user=f"u{i}"):
            start.wait(timeout=10)
            for _ in range(i + 1):
                spend(client)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(work, range(8)))
    got = rows(guard)
    assert len(got) == 36
    assert Counter(r.scope["user"] for r in got) == {f"u{i}": i + 1 for i in range(8)}


# -- 6. the default guard and guard= validation -----------------------------------------------------


def test_client_without_guard_records_into_the_default_guard(fake: FakeLLM) -> None:
    """A client built with no guard= records into tokenguard.default_guard() (memory:// from the env)."""
    client = fake.openai()
    default = tokenguard.default_guard()
    assert client.guard is default
    assert default.store.url == "memory://"
    spend(client)
    assert len(rows(default)) == 1


def test_wrap_without_guard_uses_the_default_guard(fake: FakeLLM) -> None:
    """wrap(c) with no guard= records into the default guard."""
    spend(tokenguard.wrap(fake.vendor_anthropic()))
    assert len(rows(tokenguard.default_guard())) == 1


def test_set_default_guard_redirects(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """After set_default_guard(g), a client built with no guard= records into g."""
    previous = tokenguard.default_guard()
    tokenguard.set_default_guard(guard)
    assert tokenguard.default_guard() is guard
    spend(fake.anthropic())
    assert len(rows(guard)) == 1
    assert rows(previous) == []


@pytest.mark.parametrize(
    "make",
    [
        lambda fake: fake.openai(guard=123),
        lambda fake: fake.openai(guard=123, async_=True),
        lambda fake: fake.anthropic(guard=123),
        lambda fake: tokenguard.wrap(fake.vendor_openai(), guard=123),
    ],
    ids=["OpenAI", "AsyncOpenAI", "Anthropic", "wrap"],
)
def test_guard_of_the_wrong_type_is_a_configuration_error(fake: FakeLLM, make: Any) -> None:
    """guard=123 raises ConfigurationError naming "guard"."""
    with pytest.raises(tokenguard.ConfigurationError, match="guard") as info:
        make(fake)
    assert info.value.setting == "guard"


def test_set_default_guard_of_the_wrong_type_is_a_configuration_error() -> None:
    """set_default_guard(123) raises ConfigurationError naming "guard"."""
    with pytest.raises(tokenguard.ConfigurationError, match="guard"):
        tokenguard.set_default_guard(123)  # type: ignore[arg-type]


def test_unknown_store_scheme_is_a_configuration_error() -> None:
    """Guard(store="ftp://x") raises ConfigurationError naming the store setting."""
    with pytest.raises(tokenguard.ConfigurationError, match="store") as info:
        tokenguard.Guard(store="ftp://x")
    assert info.value.setting == "store"


def test_store_error_does_not_reveal_a_password() -> None:
    """The error for a redis:// URL with a password does not contain the password."""
    with pytest.raises(tokenguard.ConfigurationError) as info:
        tokenguard.Guard(store="redis://u:secretpw@h/0")
    assert "secretpw" not in str(info.value)
    assert "secretpw" not in repr(info.value.value)
    assert "store" in str(info.value)


# -- 7. secrets never reach the ledger -------------------------------------------------------------

OPENAI_KEY = "sk-SECRET-abc123"
ANTHROPIC_KEY = "sk-ant-SECRET-xyz"


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


@pytest.fixture
def sqlite_ledger_dir(tmp_path: Path, fake: FakeLLM) -> Path:
    """A SQLite ledger written by plain, streamed and failing calls with secret keys, then closed."""
    directory = tmp_path / "ledger"
    guard = tokenguard.Guard(store=f"sqlite:///{directory / 'ledger.db'}", retry=False)
    oai = fake.openai(guard=guard, api_key=OPENAI_KEY)
    ant = fake.anthropic(guard=guard, api_key=ANTHROPIC_KEY)
    spend(oai)
    _drain(spend(oai, stream=True, stream_options={"include_usage": True}))
    spend(ant)
    _drain(spend(ant, stream=True))
    fake.fail(401, message=f"bad key {OPENAI_KEY[:3]}...")
    with pytest.raises(openai.AuthenticationError):
        spend(oai)
    fake.fail(429)
    with pytest.raises(anthropic.RateLimitError):
        spend(ant)
    assert len(rows(guard)) == 6
    assert fake.requests[0].headers["authorization"] == f"Bearer {OPENAI_KEY}"  # the key was really sent
    guard.close()
    return directory


def test_no_ledger_file_contains_a_key(sqlite_ledger_dir: Path) -> None:
    """No file of the SQLite ledger (db, -wal, -shm) contains an API key or "Bearer"."""
    files = [p for p in sqlite_ledger_dir.rglob("*") if p.is_file()]
    assert any(p.name == "ledger.db" for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in (OPENAI_KEY, ANTHROPIC_KEY, "SECRET", "Bearer"):
            assert secret.encode() not in data, (path.name, secret)


def test_no_ledger_row_contains_a_key(sqlite_ledger_dir: Path) -> None:
    """No field of any stored row contains an API key or "Bearer"."""
    guard = tokenguard.Guard(store=f"sqlite:///{sqlite_ledger_dir / 'ledger.db'}")
    try:
        got = rows(guard)
    finally:
        guard.close()
    assert len(got) == 6
    for row in got:
        text = repr(row)
        for secret in (OPENAI_KEY, ANTHROPIC_KEY, "SECRET", "Bearer"):
            assert secret not in text


# -- 8. unpriced models ---------------------------------------------------------------------------

PRIVATE = "my-private-llm"


@pytest.fixture
def fresh_unpriced_warnings(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str]]:
    """Forget which unpriced models were already warned about."""
    fresh: set[tuple[str, str]] = set()
    monkeypatch.setattr(tokenguard._pipeline, "_warned_unpriced", fresh)
    return fresh


def _private(client: Any) -> Any:
    return client.chat.completions.create(model=PRIVATE, messages=MSGS)


def test_unpriced_model_call_succeeds_unpriced(
    fake: FakeLLM, guard: tokenguard.Guard, fresh_unpriced_warnings: set[tuple[str, str]]
) -> None:
    """A model with no known price is answered and recorded with cost_usd None."""
    client = fake.openai(guard=guard)
    with pytest.warns(tokenguard.UnpricedModelWarning):
        completion = _private(client)
    assert isinstance(completion, ChatCompletion)
    row = only_row(guard)
    assert row.model == PRIVATE
    assert row.outcome == "ok"
    assert row.cost_usd is None
    assert row.usage.input_tokens == 9


def test_unpriced_model_warns_once(
    fake: FakeLLM, guard: tokenguard.Guard, fresh_unpriced_warnings: set[tuple[str, str]]
) -> None:
    """Two calls to the same unpriced model emit exactly one UnpricedModelWarning naming it."""
    client = fake.openai(guard=guard)

    def two_calls() -> None:
        _private(client)
        _private(client)

    with pytest.warns(tokenguard.UnpricedModelWarning) as record:  # records every warning ("always")
        two_calls()
    unpriced = [w for w in record if issubclass(w.category, tokenguard.UnpricedModelWarning)]
    assert len(unpriced) == 1
    assert PRIVATE in str(unpriced[0].message)
    assert [r.cost_usd for r in rows(guard)] == [None, None]


def test_unpriced_call_is_recorded_when_warnings_are_errors(
    fake: FakeLLM, guard: tokenguard.Guard, fresh_unpriced_warnings: set[tuple[str, str]]
) -> None:
    """With UnpricedModelWarning turned into an error (python -W error), the call still returns and is recorded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", tokenguard.UnpricedModelWarning)
        completion = _private(fake.openai(guard=guard))
    assert isinstance(completion, ChatCompletion)
    row = only_row(guard)
    assert (row.model, row.outcome, row.cost_usd) == (PRIVATE, "ok", None)


def test_require_prices_blocks_before_sending(fake: FakeLLM, fresh_unpriced_warnings: set[tuple[str, str]]) -> None:
    """With require_prices=True an unpriced model raises UnpricedModelError and nothing is sent."""
    guard = tokenguard.Guard(store="memory://", require_prices=True)
    with pytest.raises(tokenguard.UnpricedModelError, match=PRIVATE) as info:
        _private(fake.openai(guard=guard))
    assert info.value.model == PRIVATE
    assert fake.requests == []
    row = only_row(guard)
    assert (row.outcome, row.error, row.model) == ("blocked", "unpriced", PRIVATE)


async def test_require_prices_blocks_async_anthropic(
    fake: FakeLLM, fresh_unpriced_warnings: set[tuple[str, str]]
) -> None:
    """require_prices=True blocks an unpriced Anthropic model on an async client too."""
    guard = tokenguard.Guard(store="memory://", require_prices=True)
    client = fake.anthropic(guard=guard, async_=True)
    with pytest.raises(tokenguard.UnpricedModelError, match="claude-private"):
        await client.messages.create(model="claude-private", max_tokens=10, messages=MSGS)
    assert fake.requests == []
    assert only_row(guard).outcome == "blocked"


def test_registered_price_is_used_exactly(fake: FakeLLM, fresh_unpriced_warnings: set[tuple[str, str]]) -> None:
    """After guard.register_price() the call goes through at input*1e-6 + output*2e-6 USD exactly."""
    guard = tokenguard.Guard(store="memory://", require_prices=True)
    guard.register_price(PRIVATE, input_mtok="1", output_mtok="2")
    fake.reply(input_tokens=1234, output_tokens=567)
    _private(fake.openai(guard=guard))
    row = only_row(guard)
    assert row.outcome == "ok"
    assert row.cost_usd == Decimal(1234) * Decimal("0.000001") + Decimal(567) * Decimal("0.000002")
    assert row.cost_usd == Decimal("0.002368")
    assert fresh_unpriced_warnings == set()


# -- 9. spent() and stats() -----------------------------------------------------------------------


class Clock:
    """A settable UTC clock."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


DAY1 = datetime(2025, 6, 1, 23, 30, tzinfo=UTC)
DAY2 = datetime(2025, 6, 2, 9, 15, tzinfo=UTC)


@pytest.fixture
def two_days(fake: FakeLLM) -> tuple[tokenguard.Guard, list[tokenguard.LedgerRow]]:
    """Calls on two days: alice on day 1, alice and bob on day 2, plus one failed call of bob's."""
    clock = Clock(DAY1)
    guard = tokenguard.Guard(store="memory://", clock=clock, retry=False)
    client = fake.openai(guard=guard)
    fake.reply(input_tokens=1000, output_tokens=100)
    with tokenguard.scope(user="alice"):
        spend(client)
    clock.now = DAY2
    fake.reply(input_tokens=2000, output_tokens=200).reply(input_tokens=4000, output_tokens=400)
    with tokenguard.scope(user="alice"):
        spend(client)
    with tokenguard.scope(user="bob"):
        spend(client)
        fake.fail(500)
        with pytest.raises(openai.InternalServerError):
            spend(client)
    got = rows(guard)
    assert [r.ts for r in got] == [DAY1, DAY2, DAY2, DAY2]
    assert all(r.cost_usd is not None for r in got)
    return guard, got


def test_spent_day_counts_only_today(two_days: tuple[tokenguard.Guard, list[tokenguard.LedgerRow]]) -> None:
    """spent(period="day") sums only the calls of the clock's current day."""
    guard, got = two_days
    today = guard.spent(period="day")
    assert isinstance(today, Decimal)
    assert today == got[1].cost_usd + got[2].cost_usd  # type: ignore[operator]
    assert today > 0


def test_spent_total_counts_every_day(two_days: tuple[tokenguard.Guard, list[tokenguard.LedgerRow]]) -> None:
    """spent(period="total") (the default) sums both days."""
    guard, got = two_days
    total = sum((r.cost_usd for r in got), Decimal(0))  # type: ignore[misc]
    assert guard.spent(period="total") == total
    assert guard.spent() == total
    assert total > guard.spent(period="day")


def test_spent_filters_by_scope(two_days: tuple[tokenguard.Guard, list[tokenguard.LedgerRow]]) -> None:
    """spent(..., user=...) counts only that user's calls."""
    guard, got = two_days
    assert guard.spent(period="day", user="alice") == got[1].cost_usd
    assert guard.spent(period="total", user="alice") == got[0].cost_usd + got[1].cost_usd  # type: ignore[operator]
    assert guard.spent(period="day", user="bob") == got[2].cost_usd
    assert guard.spent(period="total", user="carol") == 0


def test_stats_for_a_scope(two_days: tuple[tokenguard.Guard, list[tokenguard.LedgerRow]]) -> None:
    """stats(user=...) reports calls, tokens, spend (as Decimal) and errors of that user."""
    guard, got = two_days
    alice = guard.stats(user="alice")
    assert (alice.calls, alice.input_tokens, alice.output_tokens, alice.errors) == (2, 3000, 300, 0)
    assert isinstance(alice.spent_usd, Decimal)
    assert alice.spent_usd == got[0].cost_usd + got[1].cost_usd  # type: ignore[operator]
    bob = guard.stats(user="bob")
    assert (bob.calls, bob.input_tokens, bob.output_tokens, bob.errors) == (2, 4000, 400, 1)
    assert bob.spent_usd == got[2].cost_usd


def test_stats_over_everything(two_days: tuple[tokenguard.Guard, list[tokenguard.LedgerRow]]) -> None:
    """stats() with no filter adds up every row."""
    guard, _ = two_days
    every = guard.stats()
    assert (every.calls, every.input_tokens, every.output_tokens, every.errors) == (4, 7000, 700, 1)
    assert every.spent_usd == guard.spent()


# -- 10. a failing store never fails the call -------------------------------------------------------


class FlakyStore(MemoryStore):
    """A memory store whose first ``failures`` writes raise StoreUnavailable."""

    url = "flaky://"

    def __init__(self, failures: int = 1) -> None:
        super().__init__()
        self.failures = failures

    def record(self, row: tokenguard.LedgerRow) -> None:
        if self.failures:
            self.failures -= 1
            raise tokenguard.StoreUnavailable("store", self.url, "down for the test")
        super().record(row)


def test_store_outage_does_not_fail_the_call(fake: FakeLLM) -> None:
    """A store that cannot write still lets the call return its ChatCompletion; the row waits in memory."""
    store = FlakyStore()
    guard = tokenguard.Guard(store=store)
    completion = spend(fake.openai(guard=guard))
    assert isinstance(completion, ChatCompletion)
    assert completion.choices[0].message.content == Reply().text
    assert guard.pipeline.unsaved == 1
    assert list(store.rows()) == []


def test_rows_kept_during_an_outage_are_written_after_it(fake: FakeLLM) -> None:
    """Once the store recovers, the next call writes the kept row and its own."""
    store = FlakyStore()
    guard = tokenguard.Guard(store=store)
    client = fake.openai(guard=guard)
    with tokenguard.scope(call="first"):
        spend(client)
    with tokenguard.scope(call="second"):
        spend(client)
    assert guard.pipeline.unsaved == 0
    assert [r.scope["call"] for r in store.rows()] == ["first", "second"]


class BrokenStore(MemoryStore):
    """A store with a bug: every write raises something other than StoreUnavailable."""

    url = "broken://"

    def record(self, row: tokenguard.LedgerRow) -> None:
        raise RuntimeError("store bug")


def test_store_bug_does_not_fail_the_call(fake: FakeLLM) -> None:
    """A store whose record() raises an unexpected exception still lets the call return."""
    guard = tokenguard.Guard(store=BrokenStore())
    assert isinstance(spend(fake.openai(guard=guard)), ChatCompletion)


def test_store_bug_does_not_replace_tokenguards_own_error(
    fake: FakeLLM, fresh_unpriced_warnings: set[tuple[str, str]]
) -> None:
    """A blocked call raises UnpricedModelError even when recording the blocked row fails unexpectedly."""
    guard = tokenguard.Guard(store=BrokenStore(), require_prices=True)
    with pytest.raises(tokenguard.UnpricedModelError):
        _private(fake.openai(guard=guard))
    assert fake.requests == []


async def test_store_outage_does_not_fail_an_async_stream(fake: FakeLLM) -> None:
    """A store outage while a stream settles does not break the async stream."""
    guard = tokenguard.Guard(store=FlakyStore())
    stream = await spend(fake.anthropic(guard=guard, async_=True), stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert guard.pipeline.unsaved == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: __import__("unittest.mock").mock.MagicMock(),
        lambda: __import__("unittest.mock").mock.MagicMock(spec=openai.OpenAI),
        lambda: __import__("unittest.mock").mock.create_autospec(openai.OpenAI),
    ],
    ids=["MagicMock", "MagicMock-spec", "autospec"],
)
def test_wrap_of_a_mock_is_a_clear_error(make: Any) -> None:
    """wrap() of a unittest.mock object (even one that passes isinstance) says what to use instead."""
    with pytest.raises(tokenguard.ConfigurationError, match=r"unittest\.mock object cannot be guarded.*FakeLLM"):
        tokenguard.wrap(make())


@pytest.mark.parametrize("thing", [None, "sk-...", 42, openai], ids=["None", "str", "int", "module"])
def test_wrap_of_something_else_names_its_type(thing: Any) -> None:
    with pytest.raises(tokenguard.ConfigurationError, match=type(thing).__name__):
        tokenguard.wrap(thing)
