"""Shared fixtures: a fresh in-memory guard, a fake LLM API, and isolation of process-wide state."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import tokenguard
from redis_server import RedisClusterServers, RedisServer
from tokenguard import _tokens
from tokenguard.testing import FakeLLM


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test touches the user's real ledger, tiktoken cache or default guard."""
    monkeypatch.setenv("TOKENGUARD_STORE", "memory://")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-empty")))
    tokenguard.set_default_guard(None)
    _tokens._reset_for_tests()
    yield
    tokenguard.set_default_guard(None)
    _tokens._reset_for_tests()


@pytest.fixture
def guard() -> tokenguard.Guard:
    """A guard with an in-memory ledger, and no retries: a scripted failure reaches the test as
    it would from one request (retrying is tested in test_retry.py)."""
    return tokenguard.Guard(store="memory://", retry=False)


@pytest.fixture
def fake() -> FakeLLM:
    """A fake OpenAI + Anthropic API with the default reply."""
    return FakeLLM()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session (tests keep apart by prefix: ``fresh_url()``)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A Redis store URL with a prefix no other test uses."""
    return redis_server.fresh_url()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A real three-node Redis Cluster for the session (tests keep apart by prefix)."""
    cluster = RedisClusterServers().start()
    yield cluster
    cluster.stop()
