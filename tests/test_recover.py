"""A damaged SQLite ledger: a clear error that names the file and the way out, the file never
touched, and ``tokenguard ledger check`` / ``recover`` to copy every readable row into a new
ledger (docs/reliability.md, "A corrupt ledger")."""

from __future__ import annotations

import hashlib
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

import tokenguard
from tokenguard import Budget, Guard, StoreUnavailable
from tokenguard.cli import main
from tokenguard.stores.sqlite import recover_ledger
from tokenguard.testing import FakeLLM

CALLS = 300
PAGE = 1024  # the ledger's page size (set before its first write)


def _ledger(path: Path) -> list[tuple[object, ...]]:
    """A real ledger: CALLS guarded calls by 300 users under a shared budget, and outcomes;
    returns its call rows (without their ids)."""
    fake = FakeLLM()
    guard = Guard(store=f"sqlite:///{path}", budgets=[Budget(limit_usd=5, period="month")], retry=False)
    client = fake.openai(guard=guard)
    for i in range(CALLS):
        with tokenguard.scope(user=f"u{i:04d}"):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=10
            )
    guard.record_outcome("resolved", 7, user="u0001")
    guard.close()
    client.close()
    return _rows(path)


def _rows(path: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(calls)") if r[1] != "id"]
        return conn.execute(f"SELECT {', '.join(columns)} FROM calls ORDER BY id").fetchall()
    finally:
        conn.close()


def _damage_page_of(path: Path, needle: bytes) -> int:
    """Break the b-tree page holding ``needle`` (its page-type byte), as a bad sector would;
    returns the page's number."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at > 0, needle
    page = at // PAGE
    assert page > 0  # never the first page: the file must stay a SQLite file
    data[page * PAGE] = 0xFF  # no such page type
    path.write_bytes(bytes(data))
    return page + 1


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_damaged_page_loses_only_its_own_rows(tmp_path: Path) -> None:
    """A damaged page of the calls table: opening the ledger and reading it raises
    StoreUnavailable naming the file and the recover command; the recovery copies every other
    row exactly, says how many are lost, keeps the budget's spend, and never writes the file."""
    path = tmp_path / "ledger.db"
    original = _ledger(path)
    _damage_page_of(path, b'"user":"u0150"')
    before = _digest(path)
    guard = Guard(store=f"sqlite:///{path}")
    with pytest.raises(StoreUnavailable) as info:
        list(guard.store.rows())
    guard.close()
    message = str(info.value)
    assert str(path) in message
    assert "tokenguard ledger recover" in message
    assert _digest(path) == before  # a failed open never "repairs" or truncates

    new = tmp_path / "recovered.db"
    report = {part.table: part for part in recover_ledger(path, new)}
    calls = report["calls"]
    assert 0 < CALLS - calls.copied <= 40  # one 1 KiB page holds a few rows
    assert calls.missing == CALLS - calls.copied
    assert not calls.complete
    recovered = _rows(new)
    assert len(recovered) == calls.copied
    assert set(recovered) <= set(original)  # every copied row is exactly an original one
    assert not any("u0150" in str(row) for row in recovered)
    assert report["outcomes"].copied == 1
    assert report["budget_spend"].complete
    assert _digest(path) == before

    conn = sqlite3.connect(new)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("SELECT sum(held_nusd) FROM budget_spend").fetchone() == (0,)
    conn.close()
    # the new ledger is a working ledger: its budget spend is the old one's (all calls, settled)
    guard = Guard(store=f"sqlite:///{new}", budgets=[Budget(limit_usd=5, period="month")])
    spent = guard.budget_overview()[0].spent_usd
    assert spent == sum((Decimal(str(r[11])) for r in original), Decimal(0))
    assert guard.stats().calls == calls.copied
    guard.close()


def test_a_file_that_is_not_a_ledger_is_refused_and_left_alone(tmp_path: Path) -> None:
    """Garbage at the ledger's path (or a header overwritten): a StoreUnavailable that names the
    file and says what to do; the bytes stay as they were; recovery says nothing can be read and
    leaves no half-made file behind."""
    path = tmp_path / "ledger.db"
    path.write_bytes(b"this is not a database, it is a note someone saved here\n" * 100)
    before = _digest(path)
    with pytest.raises(StoreUnavailable) as info:
        Guard(store=f"sqlite:///{path}")
    assert str(path) in str(info.value)
    assert "not a database" in str(info.value)
    assert "tokenguard ledger recover" in str(info.value)
    assert _digest(path) == before
    with pytest.raises(StoreUnavailable, match="nothing can be read"):
        recover_ledger(path, tmp_path / "new.db")
    assert not (tmp_path / "new.db").exists()


def test_recovery_never_writes_over_a_file(tmp_path: Path) -> None:
    """The target of a recovery must be a new file."""
    path = tmp_path / "ledger.db"
    _ledger(path)
    existing = tmp_path / "taken.db"
    existing.write_bytes(b"mine")
    with pytest.raises(StoreUnavailable, match="exists already"):
        recover_ledger(path, existing)
    assert existing.read_bytes() == b"mine"


def test_recovering_a_healthy_ledger_copies_everything(tmp_path: Path) -> None:
    """On an undamaged ledger, the recovery is a complete copy (every table it copies complete)."""
    path = tmp_path / "ledger.db"
    original = _ledger(path)
    report = recover_ledger(path, tmp_path / "copy.db")
    assert all(part.complete for part in report), report
    assert sorted(_rows(tmp_path / "copy.db")) == sorted(original)


def test_cli_check_and_recover(tmp_path: Path) -> None:
    """``tokenguard ledger check`` says ok (exit 0) or lists the damage and the recover command
    (exit 1); ``tokenguard ledger recover`` prints what it copied and what was lost."""
    path = tmp_path / "ledger.db"
    _ledger(path)
    runner = CliRunner()
    ok = runner.invoke(main, ["ledger", "check", "--store", f"sqlite:///{path}"])
    assert ok.exit_code == 0, ok.output
    assert f"{path}: ok" in ok.output
    _damage_page_of(path, b'"user":"u0200"')
    bad = runner.invoke(main, ["ledger", "check", "--store", f"sqlite:///{path}"])
    assert bad.exit_code == 1
    assert "is damaged" in bad.output
    assert "tokenguard ledger recover" in bad.output
    new = tmp_path / "new.db"
    done = runner.invoke(main, ["ledger", "recover", str(path), str(new)])
    assert done.exit_code == 0, done.output
    assert "rows copied; lost:" in done.output
    assert f"{path} is unchanged" in done.output
    again = runner.invoke(main, ["ledger", "recover", str(path), str(new)])
    assert again.exit_code == 2
    assert "exists already" in again.output
    missing = runner.invoke(main, ["ledger", "check", "--store", f"sqlite:///{tmp_path}/nope.db"])
    assert missing.exit_code == 2
    not_sqlite = runner.invoke(main, ["ledger", "check", "--store", "redis://:pw@host:6379/0"])
    assert not_sqlite.exit_code == 2
    assert "pw" not in not_sqlite.output
