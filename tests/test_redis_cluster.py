"""The Redis store on a real three-node Redis Cluster: a call's budgets live in different slots.

(The store contract and the budget tests also run on the cluster: ``redis-cluster`` in
test_stores.py and test_budgets.py.)
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from redis.crc import key_slot

import tokenguard
from redis_server import RedisClusterServers
from tokenguard import Budget, BudgetExceeded, Guard, LoopDetected
from tokenguard.stores.redis_store import RedisStore
from tokenguard.testing import FakeLLM

MODEL = "gpt-4o-mini"


def ask(client: Any, content: str, **kw: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=50, **kw
    )


def test_budgets_of_one_call_sit_in_different_slots_and_a_refusal_gives_back_the_other_slots(
    redis_cluster: RedisClusterServers,
) -> None:
    """A per-user and a shared budget hash to different slots; when the shared one refuses, the
    per-user reservation made a moment before in its own slot is released: nothing stays held."""
    g = Guard(
        store=redis_cluster.fresh_url(),
        retry=False,
        settle_delay_s=0,
        budgets=[Budget(limit_usd="1", period="day", per="user"), Budget(limit_usd="0.00005", period="month")],
    )
    store = g.pipeline.store
    assert isinstance(store, RedisStore)
    assert store.cluster
    fake = FakeLLM()
    client = fake.openai(guard=g)
    refusals: list[BudgetExceeded] = []
    for i in range(12):
        with tokenguard.scope(user="ana"):
            try:
                ask(client, f"question {i}")
            except BudgetExceeded as err:
                refusals.append(err)
    refused = len(refusals)
    assert refused > 0
    assert {err.budget.period for err in refusals} == {"month"}
    statuses = {s.budget.period: s for s in g.budget_status(user="ana")}
    slots = {
        key_slot(store._bkey(f"{s.budget.id}|{s.key or ''}", s.period_start.timestamp()).encode())
        for s in statuses.values()
        if s.period_start is not None
    }
    assert len(slots) == 2  # the two budget keys really live in different slots
    assert statuses["day"].held_usd == 0
    assert statuses["month"].held_usd == 0
    # what the user's budget counted is exactly what the shared one did: the refused calls added nothing
    assert statuses["day"].spent_usd == statuses["month"].spent_usd == g.spent(period="day")
    assert statuses["month"].spent_usd <= Decimal("0.00005")
    assert len(fake.requests) == 12 - refused
    g.close()


def test_loops_cache_and_ledger_work_on_the_cluster(redis_cluster: RedisClusterServers) -> None:
    """The loop detector's keys (one slot per scope), the shared cache and the ledger's stream and
    totals all work against the cluster, for two guards sharing it."""
    url = redis_cluster.fresh_url()
    fake = FakeLLM()
    guards = [
        Guard(
            store=url,
            retry=False,
            settle_delay_s=0,
            cache=tokenguard.Cache(url),
            loops=tokenguard.LoopDetector(max_repeats=2),
        )
        for _ in range(2)
    ]
    clients = [fake.openai(guard=g) for g in guards]
    ask(clients[0], "cached", temperature=0)
    ask(clients[1], "cached", temperature=0)  # a hit from the other guard's entry
    assert len(fake.requests) == 1
    with tokenguard.scope(user="bo"):
        ask(clients[0], "again")
        ask(clients[1], "again")
        with pytest.raises(LoopDetected):
            ask(clients[0], "again")
    assert len(fake.requests) == 3
    for g in guards:
        g.flush()
    stats = guards[0].stats()
    assert (stats.calls, stats.cache_hits, stats.loops_blocked) == (5, 1, 1)
    assert guards[1].stats(user="bo").loops_blocked == 1
    assert len(list(guards[0].store.rows())) == 5
    for g in guards:
        g.close()
