"""Guarded clients on the llmock server (the ``llmock`` fixture), shared by the end-to-end test
files; every client a test opens is closed after it, so no socket outlives its test."""

from __future__ import annotations

from typing import Any

import pytest

import tokenguard

_open: list[Any] = []


@pytest.fixture(autouse=True)
async def close_clients() -> Any:
    """Close the clients the test opened (import this into an end-to-end test module)."""
    yield
    while _open:
        result = _open.pop().close()
        if result is not None:
            await result


def oai(llmock: Any, guard: tokenguard.Guard, *, async_: bool = False) -> Any:
    """A guarded OpenAI client on the llmock server."""
    cls = tokenguard.AsyncOpenAI if async_ else tokenguard.OpenAI
    client = cls(base_url=llmock.base_url("openai"), api_key="sk-e2e-key", guard=guard)
    _open.append(client)
    return client


def ant(llmock: Any, guard: tokenguard.Guard, *, async_: bool = False) -> Any:
    """A guarded Anthropic client on the llmock server."""
    cls = tokenguard.AsyncAnthropic if async_ else tokenguard.Anthropic
    client = cls(base_url=llmock.base_url("anthropic"), api_key="sk-ant-e2e-key", guard=guard)
    _open.append(client)
    return client


def only_row(guard: tokenguard.Guard) -> tokenguard.LedgerRow:
    """The guard's one ledger row."""
    rows = list(guard.store.rows())
    assert len(rows) == 1, rows
    return rows[0]
