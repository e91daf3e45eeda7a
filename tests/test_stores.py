"""Ledger stores: one contract run against every store, SQLite specifics, and ``open_store`` URLs."""

from __future__ import annotations

import gc
import multiprocessing
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from tokenguard import ConfigurationError, LedgerRow, Stats, Store, StoreUnavailable, Usage
from tokenguard._budget import BudgetStore, Claim
from tokenguard.stores import MemoryStore, SQLiteStore, open_store
from tokenguard.stores import sqlite as sqlite_store

T0 = datetime(2026, 3, 18, 12, 0, 0, 250_000, tzinfo=UTC)
TINY = Decimal("0.000000075")  # gpt-4o-mini's price of one cached input token; not exact in binary float


def make_row(
    i: int = 0,
    *,
    ts: datetime | None = None,
    scope: dict[str, str] | None = None,
    cost: Decimal | None = TINY,
    **fields: object,
) -> LedgerRow:
    """A ledger row ``i`` seconds after T0 (unless ``ts`` is given)."""
    return LedgerRow(
        ts=ts if ts is not None else T0 + timedelta(seconds=i),
        vendor=str(fields.pop("vendor", "openai")),
        endpoint=str(fields.pop("endpoint", "chat.completions")),
        model=str(fields.pop("model", "gpt-4o-mini")),
        scope=MappingProxyType(dict(scope or {})),
        cost_usd=cost,
        **fields,  # type: ignore[arg-type]
    )


def _record_rows_worker(path: str, worker: int, count: int, barrier: Any) -> None:
    """Process worker: open the shared ledger and record ``count`` rows (even workers commit every row)."""
    store = SQLiteStore(path, write_behind_s=0 if worker % 2 == 0 else 0.05)
    barrier.wait(timeout=60)
    for i in range(count):
        store.record(make_row(i, scope={"worker": str(worker)}, cost=worker_cost(worker, i)))
    store.close()


_KEEP_ALIVE: list[SQLiteStore] = []


def _record_without_close_worker(path: str, count: int) -> None:
    """Process worker that records rows and returns without flushing or closing the (still referenced) store."""
    store = SQLiteStore(path)
    _KEEP_ALIVE.append(store)  # held for the process's life, as a module-level guard would be
    for i in range(count):
        store.record(make_row(i, cost=TINY))


def worker_cost(worker: int, i: int) -> Decimal:
    return TINY * (i + 1) + Decimal(worker) / 1000


# --------------------------------------------------------------------------- the store contract


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster", "redis-with-sqlite-ledger"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Each store implementation, fresh and empty."""
    s: Store
    if request.param == "redis":
        s = open_store(request.getfixturevalue("redis_url"))
    elif request.param == "redis-with-sqlite-ledger":
        s = open_store(request.getfixturevalue("redis_url") + f"&ledger=sqlite:///{tmp_path / 'rows.db'}")
    elif request.param == "redis-cluster":
        s = open_store(request.getfixturevalue("redis_cluster").fresh_url())
    else:
        s = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "l.db")
    yield s
    s.close()


def mixed_rows() -> list[LedgerRow]:
    """One row of every kind the pipeline writes."""
    return [
        make_row(0, usage=Usage(1000, 200, 300, 100, 50, 80), cost=Decimal("0.00123"), scope={"user": "a"}),
        make_row(1, outcome="error", error="RateLimitError", attempts=3, cost=Decimal(0), scope={"user": "b"}),
        make_row(2, outcome="incomplete", estimated=True, usage=Usage(50, 7), cost=Decimal("0.0000091")),
        make_row(3, outcome="cache_hit", attempts=0, cost=Decimal(0), saved_usd=Decimal("0.0042"), scope={"user": "a"}),
        make_row(4, outcome="blocked", error="loop", attempts=0, cost=None, usage=Usage(10, 0)),
        make_row(5, outcome="blocked", error="budget", attempts=0, cost=None, scope={"user": "a", "team": "x"}),
        make_row(6, outcome="blocked", error="unpriced", attempts=0, cost=None),
        make_row(7, model="private-llm", cost=None, usage=Usage(40, 4), attempts=2),  # ok but unpriced
        make_row(8, outcome="incomplete", cost=None, estimated=True, usage=Usage(9, 1)),  # incomplete, unpriced
        make_row(9, attempts=2, stream=True, request_id="req_1", latency_s=1.25, scope={"user": "b", "team": "x"}),
        make_row(10, outcome="error", error="APIConnectionError", attempts=1, cost=None),
    ]


class TestStoreContract:
    """The behaviour every ``Store`` promises, checked on each implementation."""

    def test_is_a_store(self, store: Store) -> None:
        """Each implementation satisfies the runtime-checkable Store protocol and has a URL."""
        assert isinstance(store, Store)
        assert isinstance(store.url, str)
        assert store.url

    def test_empty_store(self, store: Store) -> None:
        """A new store has no rows, has spent 0 and has all-zero stats."""
        assert list(store.rows()) == []
        assert store.spent(since=None, scope={}) == Decimal(0)
        assert store.stats(since=None, scope={}) == Stats()

    def test_row_round_trips_every_field(self, store: Store) -> None:
        """A recorded row comes back equal in every field (time to the microsecond, money exact)."""
        row = LedgerRow(
            ts=datetime(2026, 3, 18, 12, 34, 56, 789_012, tzinfo=UTC),
            vendor="anthropic",
            endpoint="messages",
            model="claude-sonnet-4-5",
            scope=MappingProxyType({"user": "alice", "project": "x"}),
            usage=Usage(1789, 613, 401, 307, 101, 211),
            cost_usd=Decimal("0.012345678901234"),
            estimated=True,
            outcome="incomplete",
            error="ReadTimeout",
            attempts=3,
            latency_s=2.5,
            stream=True,
            request_id="req_abc",
            saved_usd=Decimal("0.5"),
        )
        store.record(row)
        (back,) = store.rows()
        assert back == row
        assert back.ts.utcoffset() == timedelta(0)
        assert isinstance(back.cost_usd, Decimal)
        assert dict(back.scope) == {"user": "alice", "project": "x"}

    def test_none_money_round_trips(self, store: Store) -> None:
        """cost_usd=None and saved_usd=None stay None (unpriced is not free)."""
        store.record(make_row(0, cost=None))
        (back,) = store.rows()
        assert back.cost_usd is None
        assert back.saved_usd is None

    def test_exponent_decimals_round_trip(self, store: Store) -> None:
        """Decimals written with an exponent (7.5E-8, 1E+2) come back with the same value."""
        store.record(make_row(0, cost=Decimal("7.5E-8"), saved_usd=Decimal("1E+2")))
        (back,) = store.rows()
        assert back.cost_usd == Decimal("0.000000075")
        assert back.saved_usd == Decimal(100)

    def test_rows_oldest_first(self, store: Store) -> None:
        """rows() returns rows ordered by time, whatever the recording order; equal times keep recording order."""
        order = [5, 1, 4, 0, 3, 2]
        for i in order:
            store.record(make_row(i, request_id=f"r{i}"))
        same = T0 + timedelta(seconds=2)
        store.record(make_row(ts=same, request_id="r2-second"))
        store.record(make_row(ts=same, request_id="r2-third"))
        assert [r.request_id for r in store.rows()] == ["r0", "r1", "r2", "r2-second", "r2-third", "r3", "r4", "r5"]

    def test_since_is_inclusive_and_until_exclusive(self, store: Store) -> None:
        """since= includes a row at exactly that time; until= excludes it."""
        for i in range(6):
            store.record(make_row(i, request_id=f"r{i}"))
        t = T0 + timedelta(seconds=2)
        u = T0 + timedelta(seconds=4)
        assert [r.request_id for r in store.rows(since=t)] == ["r2", "r3", "r4", "r5"]
        assert [r.request_id for r in store.rows(until=u)] == ["r0", "r1", "r2", "r3"]
        assert [r.request_id for r in store.rows(since=t, until=u)] == ["r2", "r3"]
        assert list(store.rows(since=u, until=t)) == []

    def test_since_and_until_with_microseconds(self, store: Store) -> None:
        """Time filters are exact to the microsecond."""
        base = datetime(2026, 3, 18, 12, 0, 0, 999_998, tzinfo=UTC)
        for k in range(3):
            store.record(make_row(ts=base + timedelta(microseconds=k), request_id=f"r{k}"))
        mid = base + timedelta(microseconds=1)
        assert [r.request_id for r in store.rows(since=mid)] == ["r1", "r2"]
        assert [r.request_id for r in store.rows(until=mid)] == ["r0"]

    def test_since_in_another_timezone(self, store: Store) -> None:
        """An aware since= in another zone selects the same instant."""
        for i in range(3):
            store.record(make_row(i * 3600, request_id=f"r{i}"))
        since = (T0 + timedelta(hours=1)).astimezone(timezone(timedelta(hours=2)))
        assert [r.request_id for r in store.rows(since=since)] == ["r1", "r2"]

    def test_scope_filter(self, store: Store) -> None:
        """scope= keeps rows having every wanted attribute with the same value (extra attributes allowed)."""
        store.record(make_row(0, scope={"user": "a", "team": "x"}, request_id="ax"))
        store.record(make_row(1, scope={"user": "b", "team": "x"}, request_id="bx"))
        store.record(make_row(2, scope={"user": "a"}, request_id="a"))
        store.record(make_row(3, scope={}, request_id="none"))
        assert [r.request_id for r in store.rows(scope={"user": "a"})] == ["ax", "a"]
        assert [r.request_id for r in store.rows(scope={"team": "x"})] == ["ax", "bx"]
        assert [r.request_id for r in store.rows(scope={"user": "a", "team": "x"})] == ["ax"]
        assert [r.request_id for r in store.rows(scope={"user": "a", "team": "y"})] == []
        assert [r.request_id for r in store.rows(scope={"user": "c"})] == []
        assert len(list(store.rows(scope={}))) == 4
        assert len(list(store.rows(scope=None))) == 4

    def test_scope_filter_values_are_exact(self, store: Store) -> None:
        """Scope values match exactly: no prefix, case-folding or type coercion."""
        store.record(make_row(0, scope={"user": "alice"}))
        store.record(make_row(1, scope={"user": "1"}))
        assert list(store.rows(scope={"user": "ali"})) == []
        assert list(store.rows(scope={"user": "Alice"})) == []
        assert len(list(store.rows(scope={"user": "1"}))) == 1

    def test_spent_is_an_exact_decimal_sum(self, store: Store) -> None:
        """1000 rows of $0.000000075 spend exactly $0.000075 (a float sum would not)."""
        for i in range(1000):
            store.record(make_row(i))
        assert sum([float(TINY)] * 1000) != float(Decimal("0.000075"))  # the trap this test guards against
        total = store.spent(since=None, scope={})
        assert isinstance(total, Decimal)
        assert total == Decimal("0.000075")

    def test_spent_large_totals_keep_nano_dollars(self, store: Store) -> None:
        """A total above $10M keeps its 1e-9 digits exactly (no float, no overflow)."""
        amounts = [Decimal("9999.999999999")] * 1200 + [Decimal("123456.000000001"), Decimal("0.000000001")]
        for i, amount in enumerate(amounts):
            store.record(make_row(i, cost=amount))
        expected = sum(amounts, Decimal(0))
        assert expected == Decimal("12123455.999998802")
        assert store.spent(since=None, scope={}) == expected
        assert store.stats(since=None, scope={}).spent_usd == expected

    def test_spent_ignores_unpriced_rows_and_filters(self, store: Store) -> None:
        """spent() adds only priced rows matching since= and scope=."""
        store.record(make_row(0, cost=Decimal("1.1"), scope={"user": "a"}))
        store.record(make_row(1, cost=None, scope={"user": "a"}))
        store.record(make_row(2, cost=Decimal("2.2"), scope={"user": "b"}))
        store.record(make_row(3, cost=Decimal("3.3"), scope={"user": "a"}))
        assert store.spent(since=None, scope={}) == Decimal("6.6")
        assert store.spent(since=None, scope={"user": "a"}) == Decimal("4.4")
        assert store.spent(since=T0 + timedelta(seconds=1), scope={"user": "a"}) == Decimal("3.3")

    def test_nothing_matching_is_zero(self, store: Store) -> None:
        """When rows exist but none match since= / scope=, spent() is 0 and stats() are all zero."""
        store.record(make_row(0, cost=Decimal("1.1"), scope={"user": "a"}))
        later = T0 + timedelta(seconds=10)
        assert store.spent(since=later, scope={}) == Decimal(0)
        assert store.spent(since=None, scope={"user": "nobody"}) == Decimal(0)
        assert store.stats(since=later, scope={}) == Stats()
        assert store.stats(since=None, scope={"user": "nobody"}) == Stats()

    def test_only_unpriced_rows_spend_zero(self, store: Store) -> None:
        """Rows that all have cost_usd=None spend exactly 0."""
        store.record(make_row(0, cost=None))
        store.record(make_row(1, cost=None, outcome="blocked", error="budget"))
        assert store.spent(since=None, scope={}) == Decimal(0)
        assert store.stats(since=None, scope={}).spent_usd == Decimal(0)

    def test_stats_equal_the_reference_sum(self, store: Store) -> None:
        """stats() equals Stats.of(rows) for a mix of every outcome, retries and unpriced rows."""
        rows = mixed_rows()
        for row in rows:
            store.record(row)
        got = store.stats(since=None, scope={})
        assert got == Stats.of(list(store.rows()))
        assert got == Stats.of(rows)
        # pin the reference so a wrong Stats.of could not make this pass
        assert got == Stats(
            calls=11,
            cache_hits=1,
            saved_usd=Decimal("0.0042"),
            retries=2 + 1 + 1,
            attempts=1 + 3 + 1 + 2 + 1 + 2 + 1,  # HTTP requests: none for a hit or a block
            loops_blocked=1,
            budget_blocks=1,
            blocked=3,
            input_tokens=1000 + 50 + 10 + 40 + 9,
            output_tokens=200 + 7 + 4 + 1,
            spent_usd=Decimal("0.00123") + Decimal("0.0000091") + TINY,
            errors=2,
            incomplete=2,
            estimated_calls=2,
            unpriced_calls=2,
            cache_read_tokens=300,
            cache_write_tokens=100,
            reasoning_tokens=80,
        )

    @pytest.mark.parametrize(
        ("since_s", "scope"),
        [(None, {"user": "a"}), (3, {}), (3, {"user": "a"}), (None, {"team": "x"}), (4, {"user": "b"})],
    )
    def test_stats_filters_match_rows_filters(self, store: Store, since_s: int | None, scope: dict[str, str]) -> None:
        """stats(since=, scope=) equals Stats.of(rows(since=, scope=))."""
        for row in mixed_rows():
            store.record(row)
        since = None if since_s is None else T0 + timedelta(seconds=since_s)
        assert store.stats(since=since, scope=scope) == Stats.of(list(store.rows(since=since, scope=scope)))

    def test_stats_and_spent_see_rows_just_recorded(self, store: Store) -> None:
        """A read right after record() sees the row (the process always reads its own writes)."""
        store.record(make_row(0, cost=Decimal("0.5")))
        assert store.spent(since=None, scope={}) == Decimal("0.5")
        store.record(make_row(1, cost=Decimal("0.25")))
        assert store.stats(since=None, scope={}).calls == 2
        assert store.spent(since=None, scope={}) == Decimal("0.75")

    def test_many_threads_record_into_one_store(self, store: Store) -> None:
        """8 threads x 200 rows on one store object: exactly 1600 rows and the exact total."""
        start = threading.Barrier(8, timeout=30)
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                start.wait()
                for i in range(200):
                    store.record(make_row(i, scope={"thread": str(t)}, cost=worker_cost(t, i)))
            except BaseException as err:  # surfaced below
                errors.append(err)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        assert errors == []
        rows = list(store.rows())
        assert len(rows) == 1600
        assert store.stats(since=None, scope={}).calls == 1600
        expected = sum((worker_cost(t, i) for t in range(8) for i in range(200)), Decimal(0))
        assert store.spent(since=None, scope={}) == expected
        for t in range(8):
            assert len(list(store.rows(scope={"thread": str(t)}))) == 200


# --------------------------------------------------------------------------- budget holds


def test_settling_a_lapsed_hold_keeps_other_live_holds(store: Store) -> None:
    """Process P's call outlives its lease (budget_hold_s); a read of the budget (any process's
    budget_status(), or a refusal) sweeps its $0.6 hold. Q then reserves $0.3, P another $0.1,
    and P's long call ends ($0.5). Q's and P's live holds ($0.4) must still count, so a $0.5
    reservation no longer fits under the $1 cap (on every store)."""
    assert isinstance(store, BudgetStore)
    p, q, r = ("host-a", 1), ("host-a", 2), ("host-b", 3)
    t = time.time()

    def claim(usd: str) -> Claim:
        return Claim("lapse|", 0.0, Decimal(usd), 0, Decimal(1), None, True, (), "total")

    long_call = claim("0.6")  # the very claim objects are settled, as BudgetBook does
    assert store.reserve([long_call], owner=p, expires_at=t + 1, now=t) is None
    assert store.totals("lapse|", 0.0, now=t + 2).held_usd == 0  # P's lease lapsed: its hold is swept
    assert store.reserve([claim("0.3")], owner=q, expires_at=t + 900, now=t + 2) is None
    assert store.reserve([claim("0.1")], owner=p, expires_at=t + 900, now=t + 2) is None
    store.settle([([long_call], [claim("0.5")])], owner=p, now=t + 3)  # P's long call ends
    totals = store.totals("lapse|", 0.0, now=t + 3)
    over = store.reserve([claim("0.5")], owner=r, expires_at=t + 900, now=t + 3)
    assert totals == (Decimal("0.5"), Decimal("0.4"), 0, 0)
    assert over is not None  # 0.5 spent + 0.4 still in flight + 0.5 would be $1.40 of a $1 cap


# --------------------------------------------------------------------------- SQLite specifics


class TestSQLiteStore:
    """What only the SQLite ledger promises: the file, its mode, WAL, schema checks and process safety."""

    def test_creates_file_and_directory_private(self, tmp_path: Path) -> None:
        """The ledger file is created (with missing parent directories) readable by its owner only."""
        path = tmp_path / "a" / "b" / "ledger.db"
        s = SQLiteStore(path)
        try:
            assert path.is_file()
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        finally:
            s.close()

    def test_existing_file_mode_is_left_alone(self, tmp_path: Path) -> None:
        """Opening an existing ledger does not change its permissions."""
        path = tmp_path / "l.db"
        SQLiteStore(path).close()
        path.chmod(0o640)
        SQLiteStore(path).close()
        assert stat.S_IMODE(path.stat().st_mode) == 0o640

    def test_wal_files_are_private_too(self, tmp_path: Path) -> None:
        """The -wal and -shm files next to the ledger (which hold recent rows) are not readable by others."""
        path = tmp_path / "l.db"
        s = SQLiteStore(path, write_behind_s=0)
        try:
            s.record(make_row(0))
            for suffix in ("-wal", "-shm"):
                side = path.with_name(path.name + suffix)
                assert side.exists()
                assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0, f"{side.name} is {oct(side.stat().st_mode)}"
        finally:
            s.close()

    def test_journal_mode_is_wal(self, tmp_path: Path) -> None:
        """The ledger file is in WAL mode (seen from an independent connection)."""
        path = tmp_path / "l.db"
        SQLiteStore(path).close()
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_store._SCHEMA_VERSION
        finally:
            conn.close()

    def test_url_names_the_file(self, tmp_path: Path) -> None:
        """The store's URL is sqlite:/// followed by its path."""
        s = SQLiteStore(tmp_path / "l.db")
        try:
            assert s.url == f"sqlite:///{tmp_path / 'l.db'}"
        finally:
            s.close()

    def test_reopening_sees_the_rows(self, tmp_path: Path) -> None:
        """Rows recorded before close() are there when the file is opened again."""
        path = tmp_path / "l.db"
        s = SQLiteStore(path)
        rows = mixed_rows()
        for row in rows:
            s.record(row)
        s.close()
        again = SQLiteStore(path)
        try:
            assert list(again.rows()) == rows
            assert again.stats(since=None, scope={}) == Stats.of(rows)
        finally:
            again.close()

    def test_second_store_sees_flushed_rows(self, tmp_path: Path) -> None:
        """Another store on the same file sees rows once they are committed (flush(), or write_behind_s=0)."""
        path = tmp_path / "l.db"
        writer, sync_writer, reader = SQLiteStore(path), SQLiteStore(path, write_behind_s=0), SQLiteStore(path)
        try:
            sync_writer.record(make_row(0, cost=Decimal("0.1")))
            assert reader.spent(since=None, scope={}) == Decimal("0.1")
            writer.record(make_row(1, cost=Decimal("0.2")))
            writer.flush()
            assert writer.queued == 0
            assert reader.spent(since=None, scope={}) == Decimal("0.3")
        finally:
            for s in (writer, sync_writer, reader):
                s.close()

    def test_newer_schema_is_refused(self, tmp_path: Path) -> None:
        """A file of a newer schema (user_version 99) raises StoreUnavailable naming store, and is left unchanged."""
        path = tmp_path / "l.db"
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA user_version=99")
        conn.commit()
        conn.close()
        with pytest.raises(StoreUnavailable) as info:
            SQLiteStore(path)
        assert info.value.setting == "store"
        assert "99" in str(info.value)
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 99
            assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        finally:
            conn.close()

    def test_unwritable_location_is_refused(self, tmp_path: Path) -> None:
        """A path whose parent is a regular file raises StoreUnavailable (a ConfigurationError) naming store."""
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        with pytest.raises(StoreUnavailable) as info:
            SQLiteStore(blocker / "sub" / "l.db")
        assert isinstance(info.value, ConfigurationError)
        assert info.value.setting == "store"
        assert str(info.value).startswith("store=")

    def test_not_a_database_is_refused(self, tmp_path: Path) -> None:
        """A file that is not SQLite raises StoreUnavailable naming store."""
        path = tmp_path / "l.db"
        path.write_bytes(b"this is not a database" * 100)
        with pytest.raises(StoreUnavailable) as info:
            SQLiteStore(path)
        assert info.value.setting == "store"

    @pytest.mark.parametrize("bad", [-1, 61, "1", True, None])
    def test_bad_write_behind_is_refused(self, tmp_path: Path, bad: object) -> None:
        """write_behind_s outside 0..60 seconds (or not a number) raises ConfigurationError naming it."""
        with pytest.raises(ConfigurationError) as info:
            SQLiteStore(tmp_path / "l.db", write_behind_s=bad)  # type: ignore[arg-type]
        assert info.value.setting == "write_behind_s"

    def test_processes_record_concurrently(self, tmp_path: Path) -> None:
        """4 processes x 200 rows into one file at the same time: exactly 800 rows and the exact Decimal total."""
        path = tmp_path / "shared.db"
        SQLiteStore(path).close()  # create the schema once, as a real deployment would
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_record_rows_worker, args=(str(path), w, 200, barrier)) for w in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]

        s = SQLiteStore(path)
        try:
            rows = list(s.rows())
            assert len(rows) == 800
            expected = sum((worker_cost(w, i) for w in range(4) for i in range(200)), Decimal(0))
            assert s.spent(since=None, scope={}) == expected
            assert s.stats(since=None, scope={}).calls == 800
            for w in range(4):
                assert len(list(s.rows(scope={"worker": str(w)}))) == 200
        finally:
            s.close()

    def test_worker_process_exit_writes_queued_rows(self, tmp_path: Path) -> None:
        """A multiprocessing worker that never flushes or closes its store still has its rows written at exit."""
        path = tmp_path / "l.db"
        ctx = multiprocessing.get_context("spawn")
        p = ctx.Process(target=_record_without_close_worker, args=(str(path), 5))
        p.start()
        p.join(timeout=60)
        assert p.exitcode == 0
        s = SQLiteStore(path)
        try:
            assert len(list(s.rows())) == 5
            assert s.spent(since=None, scope={}) == TINY * 5
        finally:
            s.close()

    def test_dropped_store_writes_its_queued_rows(self, tmp_path: Path) -> None:
        """Rows recorded on a store that is garbage-collected without close() are still written to the file."""
        path = tmp_path / "l.db"
        s = SQLiteStore(path)  # default write-behind: record() only queues
        s.record(make_row(0, cost=Decimal("0.5")))
        del s
        gc.collect()
        again = SQLiteStore(path)
        try:
            assert again.spent(since=None, scope={}) == Decimal("0.5")
        finally:
            again.close()


# --------------------------------------------------------------------------- open_store


class TestOpenStore:
    """``open_store`` turns a store= value into a Store."""

    def test_memory_url(self) -> None:
        """memory:// gives a new, empty MemoryStore."""
        s = open_store("memory://")
        assert isinstance(s, MemoryStore)
        assert list(s.rows()) == []

    def test_relative_sqlite_url(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """sqlite:///rel.db is a file relative to the working directory."""
        monkeypatch.chdir(tmp_path)
        s = open_store("sqlite:///rel.db")
        try:
            assert isinstance(s, SQLiteStore)
            assert (tmp_path / "rel.db").is_file()
            assert s.path.resolve() == (tmp_path / "rel.db").resolve()
        finally:
            s.close()

    def test_absolute_sqlite_url(self, tmp_path: Path) -> None:
        """sqlite:////abs/path is an absolute file path (directories created)."""
        target = tmp_path / "abs" / "ledger.db"
        assert str(target).startswith("/")
        s = open_store(f"sqlite:///{target}")
        try:
            assert isinstance(s, SQLiteStore)
            assert s.path == target
            assert target.is_file()
        finally:
            s.close()

    def test_pathlike(self, tmp_path: Path) -> None:
        """A PathLike opens a SQLite ledger at that path."""
        s = open_store(tmp_path / "p.db")
        try:
            assert isinstance(s, SQLiteStore)
            assert (tmp_path / "p.db").is_file()
        finally:
            s.close()

    def test_store_instance_passes_through(self) -> None:
        """An object that already is a Store is returned as is."""
        mem = MemoryStore()
        assert open_store(mem) is mem

    def test_empty_sqlite_path_is_refused(self) -> None:
        """sqlite:/// with no file name raises ConfigurationError naming store."""
        with pytest.raises(ConfigurationError) as info:
            open_store("sqlite:///")
        assert info.value.setting == "store"

    @pytest.mark.parametrize(
        "url",
        [
            "redis://user:pw@host/0",
            "rediss://:pw@host:6380/1",
            "redis://user:p@ss:pw@host/0",
            "postgres://admin:pw@db.example/ledger",
        ],
    )
    def test_url_passwords_are_not_in_errors(self, url: str) -> None:
        """An unsupported or unreachable URL with credentials raises ConfigurationError naming store,
        without the password."""
        with pytest.raises(ConfigurationError) as info:
            open_store(url)
        assert info.value.setting == "store"
        assert "pw" not in str(info.value)
        assert "pw" not in repr(info.value.value)
        assert "host" in str(info.value) or "db.example" in str(info.value)

    def test_password_in_query_string_is_not_in_errors(self) -> None:
        """A password given as a URL query parameter (redis://host/0?password=...) is not echoed either."""
        with pytest.raises(ConfigurationError) as info:
            open_store("redis://host/0?password=pw")
        assert "pw" not in str(info.value)

    @pytest.mark.parametrize("url", ["ftp://x", "sqlite://rel.db", "mysql://h/db", "ledger.db", ""])
    def test_unknown_url_is_refused(self, url: str) -> None:
        """An unknown scheme (or a bare string that is not a URL) raises ConfigurationError naming store."""
        with pytest.raises(ConfigurationError) as info:
            open_store(url)
        assert info.value.setting == "store"
        assert "store" in str(info.value)

    def test_non_string_is_refused(self) -> None:
        """A value that is neither a URL, a path nor a Store raises ConfigurationError naming store."""
        with pytest.raises(ConfigurationError) as info:
            open_store(42)  # type: ignore[arg-type]
        assert info.value.setting == "store"

    def test_none_is_the_default_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """None opens the default ledger file in the user data directory."""
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
        s = open_store(None)
        try:
            assert isinstance(s, SQLiteStore)
            assert s.path == tmp_path / "data" / "tokenguard" / "ledger.db"
            assert s.path.is_file()
        finally:
            s.close()


def test_budget_totals_are_read_by_primary_key_not_by_scanning(tmp_path: Path) -> None:
    """Reading a call's budget counters finds each key by the primary key: a scan of
    ``budget_spend`` (one row per key and period, kept for ever) made every admitted call
    slower as the ledger aged (bench/bench_scaling.py: +2.3 ms at 1,400 counter rows,
    +29 ms at 120,000)."""
    from tokenguard._budget import Claim

    store = SQLiteStore(tmp_path / "ledger.db")
    statements: list[str] = []
    conn = store._connection()
    conn.set_trace_callback(statements.append)
    claims = [Claim(f"k{i}", 0.0, Decimal(1), 1, None, None, enforce=True) for i in range(3)]
    SQLiteStore._totals_many(conn, claims)
    conn.set_trace_callback(None)
    [select] = [s for s in statements if "FROM budget_spend" in s]
    plan = " ".join(str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {select}"))
    assert "SCAN budget_spend" not in plan, plan
    assert "USING PRIMARY KEY" in plan, plan
    store.close()


def test_ledger_reads_page_through_every_row_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows and outcomes are read a page at a time: every match comes back once, in (ts, id) order,
    across page ends that fall between rows with the same timestamp, with filters applied."""
    from tokenguard import OutcomeRow

    monkeypatch.setattr(sqlite_store, "_PAGE", 3)
    store = SQLiteStore(tmp_path / "ledger.db")
    stamps = [0, 1, 1, 1, 1, 2, 3, 3, 4, 5, 5]  # ties straddle the 3-row pages
    rows = [
        make_row(ts=T0 + timedelta(seconds=s), scope={"user": "amy" if i % 2 else "bob"}, attempts=i)
        for i, s in enumerate(stamps)
    ]
    for row in rows:
        store.record(row)
    for i, s in enumerate(stamps):
        store.record_outcome(OutcomeRow(T0 + timedelta(seconds=s), f"o{i}", MappingProxyType({}), 1))
    assert [r.attempts for r in store.rows()] == list(range(len(rows)))
    amy = [r.attempts for r in store.rows(scope={"user": "amy"}, since=T0 + timedelta(seconds=1))]
    assert amy == [i for i, s in enumerate(stamps) if i % 2 and s >= 1]
    assert [r.attempts for r in store.rows(until=T0 + timedelta(seconds=3))] == [0, 1, 2, 3, 4, 5]
    assert [o.name for o in store.outcomes()] == [f"o{i}" for i in range(len(stamps))]
    assert list(store.rows(since=T0 + timedelta(days=1))) == []
    store.close()
