"""Secrets stay secret: API keys never reach a store, the cache, a log line, an error or a report;
files are private to the user; shared stores hold no pickle; the cache never serves one API key's
answer to another; Redis keys stay under their prefix; webhook URLs are redacted (SECURITY.md)."""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

import tokenguard
from redis_server import RedisServer
from tokenguard import Budget, BudgetExceeded, Cache, Guard, LoopDetected, LoopDetector, Retry
from tokenguard._html import render_html
from tokenguard._redact import redact_url
from tokenguard._report import build_report
from tokenguard.testing import FakeLLM, Reply

MARK = "TGSECRET"  # in both keys: grep for it
OPENAI_KEY = f"sk-proj-{MARK}0123456789abcdefghij"
ANTHROPIC_KEY = f"sk-ant-api03-{MARK}9876543210zyxwvu"
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _own_db(server: RedisServer, db: int, prefix: str) -> str:
    """A URL on a database no other test uses, so a SCAN sees only this test's keys."""
    base = server.url.rsplit("/", 1)[0]
    return f"{base}/{db}?prefix={prefix}"


def _redis_dump(url: str) -> str:
    """Every key and every value in the URL's database, as text."""
    client = redis.Redis.from_url(url.split("?", 1)[0])
    out: list[str] = []
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            if kind == "string":
                value: Any = client.get(key)
            elif kind == "hash":
                value = client.hgetall(key)
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            elif kind == "stream":
                value = client.xrange(key)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "set":
                value = client.smembers(key)
            else:
                value = client.dump(key)
            out.append(f"{key!r} {kind} {value!r}")
    finally:
        client.close()
    return "\n".join(out)


def _files_text(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _exercise(guard: Guard, fake: FakeLLM, errors: list[BaseException]) -> None:
    """Every path a key could leak through: misses and hits, streams, both vendors, a retried
    429, a vendor 401, a loop and a budget refusal; the errors raised are kept."""
    oai = fake.openai(guard=guard, api_key=OPENAI_KEY)
    ant = fake.anthropic(guard=guard, api_key=ANTHROPIC_KEY)
    with tokenguard.scope(user="alice", project="search"):
        for _ in range(2):  # a miss, then a hit
            oai.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, temperature=0, max_tokens=20)
            with tokenguard.cache_control(always=True):  # Anthropic's API has no temperature
                ant.messages.create(model="claude-haiku-4-5", messages=PROMPT, max_tokens=20)
        for _ in oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Stream me a story."}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=20,
        ):
            pass
        fake.fail(429, headers={"retry-after": "0"})
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "retry me"}], max_tokens=20
        )
        fake.fail(401, message="invalid key")
        try:
            oai.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "unauthorised"}], max_tokens=20
            )
        except openai.AuthenticationError as err:
            errors.append(err)
        loop = [{"role": "user", "content": "poll the job status"}]
        try:
            for _ in range(4):
                oai.chat.completions.create(model="gpt-4o-mini", messages=loop, temperature=1, max_tokens=20)
        except LoopDetected as err:
            errors.append(err)
    with tokenguard.scope(user="bob"):
        try:
            oai.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=100_000)
        except BudgetExceeded as err:
            errors.append(err)
    oai.close()
    ant.close()


def _texts_of(errors: list[BaseException]) -> str:
    out = []
    for err in errors:
        seen: BaseException | None = err
        while seen is not None:
            out += [str(seen), repr(seen), repr(seen.args), repr(vars(seen))]
            seen = seen.__cause__ or seen.__context__
    return "\n".join(out)


async def test_async_key_providers_are_told_apart(fake: FakeLLM) -> None:
    """Async OpenAI clients whose keys come from async key providers never share a cached
    answer (the key is asked from the provider before the cache key is made), while the same
    provider's key again is a hit."""
    guard = Guard(store="memory://", cache=Cache(backend="memory"), retry=False)
    clients = []
    for key in ("sk-provided-one", "sk-provided-two", "sk-provided-one"):

        async def provide(key: str = key) -> str:
            return key

        clients.append(fake.openai(guard=guard, async_=True, api_key=provide))
    for client in clients:
        await client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, temperature=0)
        await client.close()
    assert [r.headers["authorization"] for r in fake.money_requests] == [
        "Bearer sk-provided-one",
        "Bearer sk-provided-two",
    ]
    assert guard.stats().cache_hits == 1


@pytest.mark.parametrize("where", ["sqlite", "redis"])
def test_api_keys_never_reach_stores_cache_logs_errors_or_reports(
    where: str,
    tmp_path: Path,
    fake: FakeLLM,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A session through every path (hits, streams, retries, a 401, a loop, a refusal) leaves the
    keys in no file, no Redis key or value, no log record (DEBUG, every logger), no error's text
    or attributes, and no report (text or HTML)."""
    if where == "sqlite":
        store, cache = f"sqlite:///{tmp_path}/ledger.db", Cache(path=tmp_path / "cache")
    else:
        url = _own_db(redis_server, 11, "sec")
        store, cache = url, Cache(url)
    guard = Guard(
        store=store,
        cache=cache,
        budgets=[Budget(limit_usd="0.05", per="user")],
        retry=Retry(attempts=2, initial_delay_s=0.01),
        loops=LoopDetector(max_repeats=2),
    )
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG):
        _exercise(guard, fake, errors)
        guard.flush()
        report = build_report(guard.store, by=("user", "project"))
        page = render_html(report)
        shown = "\n".join([repr(guard), repr(guard.store), repr(report), str(guard.stats()), page])
        guard.close()
    assert {type(e) for e in errors} == {openai.AuthenticationError, LoopDetected, BudgetExceeded}
    assert any(r.outcome == "cache_hit" for r in guard.store.rows()) if where == "sqlite" else True
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
    assert caplog.records  # the session did log (a retry, a loop): the grep below looked at something
    leaks = {"logs": logged, "errors": _texts_of(errors), "shown": shown}
    if where == "sqlite":
        files = _files_text(tmp_path)
        assert {"ledger.db", "cache.db"} <= {p.name for p in files}
        leaks.update({str(p): data.decode("latin-1") for p, data in files.items()})
    else:
        dump = _redis_dump(url)
        assert all(part in dump for part in (":b:{", ":rows", ":c:"))  # budgets, ledger and cache are there
        leaks["redis"] = dump
    for place, text in leaks.items():
        assert MARK not in text, f"an API key reached {place}"
    # the fake saw the keys: the calls really carried them
    assert any(OPENAI_KEY in r.headers.get("authorization", "") for r in fake.requests)
    assert any(ANTHROPIC_KEY in str(r.headers) for r in fake.requests)


def test_ledger_and_cache_files_are_private_whatever_the_umask(tmp_path: Path, fake: FakeLLM) -> None:
    """With a permissive umask (0o002), the ledger, the cache database and their -wal/-shm files
    are 0600, and the directories tokenguard creates are 0700; large cache entries stay inside
    the private database (no value files with the umask's mode)."""
    old = os.umask(0o002)
    try:
        data, cache_dir = tmp_path / "data" / "tokenguard", tmp_path / "cache" / "tokenguard"
        guard = Guard(store=f"sqlite:///{data}/ledger.db", cache=Cache(path=cache_dir))
        big = "x" * 200_000  # well over diskcache's 32 KiB "large value" threshold
        fake.queue(Reply(text=big), Reply())
        client = fake.openai(guard=guard)
        for text in ("large", "small"):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": text}], temperature=0
            )
        assert (
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "large"}], temperature=0
            )
            .choices[0]
            .message.content
            == big
        )  # a hit, from the database
        guard.flush()
        files = [p for p in [*data.rglob("*"), *cache_dir.rglob("*")] if p.is_file()]
        assert {p.name for p in files} >= {"ledger.db", "cache.db", "cache.db-wal", "ledger.db-wal"}
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path} is {oct(path.stat().st_mode)}"
        for folder in (data, cache_dir):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, f"{folder} is {oct(folder.stat().st_mode)}"
        assert not [p for p in cache_dir.rglob("*") if p.is_dir()]  # no value-file folders
        guard.close()
        client.close()
    finally:
        os.umask(old)


def test_redis_cache_never_unpickles(
    redis_server: RedisServer, fake: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    """A pickle planted under a Redis cache key is a miss (the provider answers) and a warning,
    never loaded."""
    import pickle

    url = redis_server.fresh_url()
    guard = Guard(store="memory://", cache=Cache(url), retry=False)
    client = fake.openai(guard=guard)
    ask = {"model": "gpt-4o-mini", "messages": PROMPT, "temperature": 0}
    client.chat.completions.create(**ask)
    prefix = url.split("prefix=", 1)[1]
    raw = redis.Redis.from_url(url.split("?", 1)[0])
    keys = list(raw.scan_iter(match=f"{prefix}:c:*"))
    assert len(keys) == 1

    class Boom:
        def __reduce__(self) -> Any:
            return (os.system, ("touch /tmp/tokenguard-pwned",))

    raw.set(keys[0], pickle.dumps(Boom()))
    with caplog.at_level(logging.WARNING, logger="tokenguard"):
        reply = client.chat.completions.create(**ask)
    assert any("cache" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert reply.choices[0].message.content == "Hello from the fake LLM!"
    assert len(fake.money_requests) == 2  # the planted value was not served
    assert not Path("/tmp/tokenguard-pwned").exists()
    raw.close()
    client.close()
    guard.close()


@pytest.mark.parametrize("backend", ["disk", "memory", "redis"])
def test_one_api_key_never_gets_anothers_cached_answer(
    backend: str, tmp_path: Path, fake: FakeLLM, redis_server: RedisServer
) -> None:
    """The same request under two API keys is two entries (every backend, both vendors); the
    same key again is a hit."""
    cache = {
        "disk": lambda: Cache(path=tmp_path / "c"),
        "memory": lambda: Cache(backend="memory"),
        "redis": lambda: Cache(redis_server.fresh_url()),
    }[backend]()
    guard = Guard(store="memory://", cache=cache, retry=False)
    clients = [fake.openai(guard=guard, api_key=k) for k in ("sk-tenant-one", "sk-tenant-two", "sk-tenant-one")]
    for client in clients:
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, temperature=0)
    ants = [fake.anthropic(guard=guard, api_key=k) for k in ("sk-ant-one", "sk-ant-two", "sk-ant-one")]
    for ant in ants:
        with tokenguard.cache_control(always=True):
            ant.messages.create(model="claude-haiku-4-5", messages=PROMPT, max_tokens=20)
    keys = [
        (r.headers.get("x-api-key") or r.headers["authorization"]).removeprefix("Bearer ") for r in fake.money_requests
    ]
    assert keys == ["sk-tenant-one", "sk-tenant-two", "sk-ant-one", "sk-ant-two"]
    assert guard.stats().cache_hits == 2
    for c in [*clients, *ants]:
        c.close()
    guard.close()


def test_every_redis_key_is_under_the_prefix(redis_server: RedisServer, fake: FakeLLM) -> None:
    """Budgets, alerts, loop history, the ledger stream and totals, outcomes and the cache: after
    a session that touches all of them, every key in the database starts with ``<prefix>:``."""
    url = _own_db(redis_server, 12, "tenant-a")
    guard = Guard(
        store=url,
        cache=Cache(url),
        budgets=[Budget(limit_usd="0.0001", per="user"), Budget(limit_usd=5, period="month")],
        loops=LoopDetector(max_repeats=2),
        retry=False,
    )
    client = fake.openai(guard=guard)
    with tokenguard.scope(user="carol"):
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, temperature=0, max_tokens=10)
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, temperature=0, max_tokens=10)
        with pytest.raises(LoopDetected):
            client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, temperature=1, max_tokens=10)
    guard.record_outcome("resolved", user="carol")
    guard.flush()
    raw = redis.Redis.from_url(url.split("?", 1)[0])
    keys = sorted(k.decode() for k in raw.scan_iter(count=1000))
    raw.close()
    client.close()
    guard.close()
    kinds = {k.split(":")[1] for k in keys}
    assert {"b", "c", "l", "rows"} <= kinds, keys  # budgets, cache, loops, ledger rows
    assert all(k.startswith("tenant-a:") for k in keys), [k for k in keys if not k.startswith("tenant-a:")]


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(403)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def refusing_hook() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("failure", ["http_403", "connection_refused"])
def test_webhook_url_secrets_never_reach_the_logs(
    failure: str, refusing_hook: int, fake: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing webhook (an HTTP error, or nobody listening) is logged with the scheme and host
    only: the path and query (Slack's /services/T0/B0/XXXX, a ?token=) never appear, nor in the
    sink's repr."""
    port = refusing_hook if failure == "http_403" else _closed_port()
    url = f"http://127.0.0.1:{port}/services/T0ABC/B0DEF/{MARK}hooktoken?token={MARK}"
    sink = tokenguard.WebhookAlerts(url, timeout_s=2)
    guard = Guard(store="memory://", budgets=[Budget(limit_usd="0.00004")], on_alert=sink, retry=False)
    client = fake.openai(guard=guard)
    fake.reply(input_tokens=9, output_tokens=40)  # $0.00002535: past 50% of the cap
    with caplog.at_level(logging.DEBUG):
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=40)
        deadline = time.monotonic() + 5
        while not any("webhook alert" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.02)
    failures = [r.getMessage() for r in caplog.records if "webhook alert" in r.getMessage()]
    assert failures, "the failing webhook was not logged"
    assert f"http://127.0.0.1:{port}/***" in failures[0]
    assert ("HTTP 403" in failures[0]) == (failure == "http_403")
    assert all(MARK not in r.getMessage() for r in caplog.records)
    assert MARK not in repr(sink)
    client.close()
    guard.close()


@pytest.mark.parametrize(
    ("url", "keep_path", "shown"),
    [
        ("redis://app:hunter2@cache:6379/0?prefix=x", True, "redis://***@cache:6379/0?***"),
        ("redis://:hunter2@cache:6379/0", True, "redis://***@cache:6379/0"),
        ("https://sk-KEY:@proxy.internal/v1", True, "https://***@proxy.internal/v1"),
        ("https://TOKEN123@proxy.internal/v1/", True, "https://***@proxy.internal/v1/"),
        ("https://api.example.com/v1?api-key=abc#frag", True, "https://api.example.com/v1?***"),
        ("https://hooks.slack.com/services/T0/B0/XXXX", False, "https://hooks.slack.com/***"),
        ("https://hooks.example.com", False, "https://hooks.example.com"),
        ("sqlite:////var/lib/app/ledger.db", True, "sqlite:////var/lib/app/ledger.db"),
        ("unix:///run/redis.sock?db=2&password=pw", True, "unix:///run/redis.sock?***"),
        ("memory://", True, "memory://"),
        ("not a url?password=pw", True, "not a url?***"),
    ],
)
def test_one_redaction_rule_for_every_url(url: str, keep_path: bool, shown: str) -> None:
    """Store, cache, vendor and webhook URLs are shown by one rule: password, lone token, query,
    fragment and (for webhooks) path hidden; host, port and database kept."""
    assert redact_url(url, keep_path=keep_path) == shown
