"""Settling runs off the caller's path: rows, budgets and alerts follow within settle_delay_s,
every read through the guard settles what is queued first, and nothing queued is lost at exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import tokenguard
from tokenguard.stores import MemoryStore, SQLiteStore
from tokenguard.testing import FakeLLM, Reply

MSGS = [{"role": "user", "content": "hello"}]


def test_settle_delay_zero_records_before_the_call_returns(fake: FakeLLM) -> None:
    """With settle_delay_s=0 the row is in the store the moment the call returns."""
    store = MemoryStore()
    guard = tokenguard.Guard(store=store, settle_delay_s=0)
    fake.openai(guard=guard).chat.completions.create(model="gpt-4o", messages=MSGS)
    assert len(list(store.rows())) == 1
    assert guard.pipeline.pending == 0


def test_background_thread_settles_without_any_read(fake: FakeLLM) -> None:
    """With the default delay a background thread writes the row on its own, soon."""
    store = MemoryStore()
    guard = tokenguard.Guard(store=store)
    fake.openai(guard=guard).chat.completions.create(model="gpt-4o", messages=MSGS)
    deadline = time.monotonic() + 5
    while not list(store.rows()) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(list(store.rows())) == 1


@pytest.mark.parametrize("read", ["spent", "stats", "store_rows", "flush"])
def test_reads_through_the_guard_settle_what_is_queued(fake: FakeLLM, read: str) -> None:
    """spent(), stats(), guard.store reads and flush() all see a call made just before."""
    store = MemoryStore()
    guard = tokenguard.Guard(store=store, settle_delay_s=10)  # the worker would wait 10 s
    fake = FakeLLM(Reply(input_tokens=1000, output_tokens=100))
    fake.openai(guard=guard).chat.completions.create(model="gpt-4o", messages=MSGS)
    if read == "spent":
        assert guard.spent() > 0
    elif read == "stats":
        assert guard.stats().calls == 1
    elif read == "store_rows":
        assert len(list(guard.store.rows())) == 1
    else:
        guard.flush()
        assert len(list(store.rows())) == 1


def test_failed_and_answered_calls_keep_their_order(fake: FakeLLM) -> None:
    """Rows are written in the order the calls ended, errors included."""
    guard = tokenguard.Guard(store="memory://", settle_delay_s=10)
    client = fake.openai(guard=guard)
    client.chat.completions.create(model="gpt-4o", messages=MSGS)
    fake.fail(400)
    with pytest.raises(Exception, match="400"):
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    client.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert [r.outcome for r in guard.store.rows()] == ["ok", "error", "ok"]


def test_queued_settles_are_written_at_interpreter_exit(tmp_path: Path) -> None:
    """A process that exits right after a call, without flush() or close(), still leaves its row."""
    db = tmp_path / "ledger.db"
    script = textwrap.dedent(
        f"""
        import tokenguard
        from tokenguard.testing import FakeLLM, Reply
        guard = tokenguard.Guard(store="sqlite:///{db}", settle_delay_s=10)
        client = FakeLLM(Reply(input_tokens=1000, output_tokens=100)).openai(guard=guard)
        client.chat.completions.create(model="gpt-4o", messages=[{{"role": "user", "content": "hi"}}])
        assert guard.pipeline.pending == 1
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    store = SQLiteStore(db)
    try:
        rows = list(store.rows())
        assert len(rows) == 1
        assert rows[0].cost_usd is not None
        assert rows[0].cost_usd > 0
    finally:
        store.close()


@pytest.mark.parametrize("bad", [-1, 11, True, "0.1"])
def test_bad_settle_delay_names_the_setting(bad: object) -> None:
    """settle_delay_s outside [0, 10] seconds is a ConfigurationError naming it."""
    with pytest.raises(tokenguard.ConfigurationError) as info:
        tokenguard.Guard(store="memory://", settle_delay_s=bad)  # type: ignore[arg-type]
    assert info.value.setting == "settle_delay_s"
