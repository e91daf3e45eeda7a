"""``tokenguard demo``: the whole story runs over real loopback HTTP with the real SDK clients,
with no API key and no network, in a couple of seconds; and its server speaks HTTP as the SDKs
expect (keep-alive, streams, errors)."""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from click.testing import CliRunner
from rich.console import Console

import tokenguard
from tokenguard import _demo
from tokenguard._demo import play_demo, run_demo
from tokenguard.testing import ErrorReply, FakeLLM, FakeServer, Reply


def recording_console() -> Console:
    return Console(record=True, width=120, color_system=None)


def test_demo_tells_the_whole_story(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_demo`` runs every chapter; the server sees exactly the requests the story says; the
    report and the savings are printed; the ledger is a new file in ``store_dir``."""
    results: list[_demo.DemoResult] = []

    def spy(*args: Any, **kwargs: Any) -> _demo.DemoResult:
        results.append(play_demo(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(_demo, "play_demo", spy)
    logger = logging.getLogger("tokenguard")
    logger_before = (logger.level, logger.propagate, list(logger.handlers))
    console = recording_console()
    assert run_demo(console, store_dir=tmp_path) == 0
    text = console.export_text()
    (result,) = results

    # 1. the cache: 4 of 6 identical questions answered without a request
    assert result.cache_hits == 4
    assert text.count("cache hit") == 4
    assert result.cache_saved_usd == 3 * Decimal("0.00675") + Decimal("0.009")  # gpt-4o x3, claude-sonnet-4-6
    # 2. the 429 storm: 3 failures then the answer (4 requests); insufficient_quota sent once
    assert result.storm_attempts == 4
    assert len(re.findall(r"retry \d of 3", text)) == 3
    assert "Retry-After" in text
    assert result.quota_attempts == 1
    assert "insufficient_quota" in text
    # 3. the loop: 3 attempts sent, the other 47 refused before sending
    assert (result.loop_sent, result.loop_refused) == (3, 47)
    assert "LoopDetected" in text
    # 4. the budget: alerts at 50/75/90%, then BudgetExceeded
    assert result.alerts == [0.5, 0.75, 0.9]
    assert result.budget_blocked
    assert "BudgetExceeded" in text
    assert "Nothing was sent" in text
    # 5. the report, and the savings
    assert "tokenguard report" in text
    assert "nightly-job" in text
    assert result.report_groups == 8  # alice bob carol dana dave erin frank nightly-job
    assert result.saved_usd > result.cache_saved_usd > 0
    assert "What tokenguard saved in this demo" in text
    # what the server saw: 2 (cache misses) + 4 (storm) + 1 (quota) + 3 (loop) + 5 (Dana) requests
    assert result.server_requests == 15
    assert "Traceback" not in text
    assert result.seconds < 10

    # the ledger is kept where asked, every call in it
    (ledger,) = tmp_path.glob("tokenguard-demo-*.db")
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        (calls,) = db.execute("SELECT COUNT(*) FROM calls").fetchone()
    assert calls == 64  # 6 questions + 2 (storm, quota) + 50 (the job) + 6 (Dana)
    assert f"--store sqlite:///{ledger.as_posix()}" in text.replace("\n", "")
    # and the tokenguard logger is as it was
    assert (logger.level, logger.propagate, list(logger.handlers)) == logger_before


def test_demo_failure_is_one_line_and_status_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the demo cannot run (here: no port can be bound), it says so in one line, no traceback."""

    def no_port(self: FakeServer) -> FakeServer:
        raise OSError("[Errno 99] Cannot assign requested address")

    monkeypatch.setattr(FakeServer, "start", no_port)
    console = recording_console()
    assert run_demo(console) == 1
    text = console.export_text()
    assert text.strip() == "the demo failed: OSError: [Errno 99] Cannot assign requested address"


def test_cli_demo_command() -> None:
    """``tokenguard demo`` runs the story and exits 0 (CliRunner is no terminal: no pauses)."""
    from tokenguard.cli import main

    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    assert "What tokenguard saved in this demo" in result.output
    assert "Traceback" not in result.output


# -- the demo server -----------------------------------------------------------------------------


@pytest.fixture
def server() -> Any:
    with FakeServer(FakeLLM(Reply(text="Hello over HTTP", input_tokens=1500, output_tokens=300))) as running:
        yield running


def test_server_answers_both_sdks_over_keep_alive(server: FakeServer) -> None:
    """JSON and SSE answers reach the real SDKs intact over one reused connection each."""
    guard = tokenguard.Guard(store="memory://", retry=False, settle_delay_s=0)
    client = tokenguard.OpenAI(
        api_key="sk-demo",
        base_url=server.openai_base_url,
        guard=guard,
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )
    claude = tokenguard.Anthropic(
        api_key="sk-ant-demo",
        base_url=server.anthropic_base_url,
        guard=guard,
        http_client=anthropic.DefaultHttpxClient(trust_env=False),
    )
    with client, claude:
        msgs: Any = [{"role": "user", "content": "hi"}]
        for _ in range(3):
            answer = client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=400)
            assert answer.choices[0].message.content == "Hello over HTTP"
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o", messages=msgs, max_tokens=400, stream=True, stream_options={"include_usage": True}
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello over HTTP"
        message = claude.messages.create(model="claude-sonnet-4-6", max_tokens=400, messages=msgs)
        assert message.usage.input_tokens == 1500
        with claude.messages.stream(model="claude-sonnet-4-6", max_tokens=400, messages=msgs) as stream:
            assert stream.get_final_text() == "Hello over HTTP"
    paths = [(e.method, e.path, e.status) for e in server.exchanges]
    assert paths == [("POST", "/v1/chat/completions", 200)] * 4 + [("POST", "/v1/messages", 200)] * 2
    stats = guard.stats()
    assert (stats.calls, stats.input_tokens, stats.output_tokens, stats.estimated_calls) == (6, 9000, 1800, 0)


def test_server_passes_errors_and_headers_through(server: FakeServer) -> None:
    """A scripted error keeps its status, body and Retry-After header; tokenguard retries it."""
    server.fake.queue(ErrorReply(429, "slow down", {"retry-after-ms": "20"}))
    guard = tokenguard.Guard(store="memory://", retry=tokenguard.Retry(initial_delay_s=0.01), settle_delay_s=0)
    with tokenguard.OpenAI(
        api_key="sk-demo",
        base_url=server.openai_base_url,
        guard=guard,
        http_client=openai.DefaultHttpxClient(trust_env=False),
    ) as client:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=10)
        server.fake.queue(ErrorReply(400, "bad request"))
        with pytest.raises(openai.BadRequestError, match="bad request"):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "y"}], max_tokens=10)
    assert [e.status for e in server.exchanges] == [429, 200, 400]
    assert server.exchanges[0].headers["retry-after-ms"] == "20"


def test_server_stops_cleanly_and_frees_its_port() -> None:
    """Stopping ends open keep-alive connections and joins every thread; the port is released."""
    import socket
    import threading

    with FakeServer() as server:
        port = server.port
        client = openai.OpenAI(
            api_key="sk-demo", base_url=server.openai_base_url, http_client=openai.DefaultHttpxClient(trust_env=False)
        )
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        # the client keeps its connection open: stop() must not hang on it
    serving = [t.name for t in threading.enumerate() if t.name.startswith("tokenguard-demo")]
    assert serving == []
    with socket.create_server(("127.0.0.1", port)):
        pass
    client.close()
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.port
    assert len(server.exchanges) == 1  # still readable after the stop
