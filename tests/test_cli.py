"""The ``tokenguard`` command, through its click entry point (``tokenguard.cli.main``), on real
ledgers: a SQLite store filled by guarded calls to the fake API (several users, projects,
models and days; cache hits, a retry, a loop block, a budget block and outcomes).

A user's mistake must be one line on stderr and exit status 2, never a traceback.
The ``demo`` command is tested elsewhere.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import tokenguard
from tokenguard import _tokens
from tokenguard._config import KEYS, load_config
from tokenguard._pricing import PriceBook
from tokenguard.cli import main
from tokenguard.providers import AnthropicAdapter, OpenAIAdapter
from tokenguard.providers.anthropic import MESSAGES
from tokenguard.providers.openai import CHAT
from tokenguard.stores import SQLiteStore
from tokenguard.testing import ErrorReply, FakeLLM, Reply

DAY1 = datetime(2025, 6, 1, 10, 0, tzinfo=UTC)
DAY2 = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)
USERS = ["amy", "bob", "carol", "zed"]  # zed spends the most tokens and sorts last


# -- helpers ---------------------------------------------------------------------------------------


class Clock:
    """A settable UTC clock."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _runner() -> CliRunner:
    """A runner whose result keeps stderr apart from stdout (always so from click 8.2)."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2
    except TypeError:
        return CliRunner()


def invoke(*args: str, columns: int = 150, env: Mapping[str, str | None] | None = None, **kw: Any) -> Result:
    """Run ``tokenguard ARGS`` in-process, on a console ``columns`` wide with no colour codes."""
    environ: dict[str, str | None] = {"COLUMNS": str(columns), "FORCE_COLOR": None, "TTY_COMPATIBLE": None}
    environ.update(env or {})
    return _runner().invoke(main, list(args), env=environ, **kw)


def ok(result: Result) -> str:
    """The stdout of a run that must have succeeded."""
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


def user_error(result: Result) -> str:
    """The message of a run that must have failed as a user's mistake: status 2, one line on
    stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("Error: ")
    assert "\n" not in message, message
    return message


def row_of(output: str, first_cell: str) -> str:
    """The line of a rich table whose first cell is ``first_cell``."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if cells and cells[0] == first_cell:
            return line
        if line.strip().split("  ")[0] == first_cell:
            return line
    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


def report_table(output: str) -> dict[str, dict[str, str]]:
    """The rows of a report table (columns at least two spaces apart) by their first cell, each
    as {column header: cell}."""
    lines = output.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.strip().startswith(("user ", "calls ")))
    headers = re.split(r"\s{2,}", lines[header_at].strip())
    rows = {}
    for line in lines[header_at + 2 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == len(headers):
            rows[cells[0]] = dict(zip(headers, cells, strict=True))
    return rows


def usd4(amount: Decimal) -> str:
    """Money as the tables print it."""
    return f"${amount:,.4f}"


def chat(client: Any, content: str, *, model: str = "gpt-4o", max_tokens: int = 50, **kw: Any) -> Any:
    """One chat completion with a single user message."""
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, **kw
    )


# -- the shared ledger -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ledger:
    """A SQLite ledger written by guarded calls, and its rows read back."""

    path: Path
    rows: list[tokenguard.LedgerRow]
    outcomes: list[tokenguard.OutcomeRow]

    @property
    def url(self) -> str:
        """The store URL of the ledger, for ``--store``."""
        return f"sqlite:///{self.path}"


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    """Calls by amy, bob, carol and zed in projects alpha/beta on 2025-06-01, 2025-06-02 and an
    hour ago, on gpt-4o and claude-haiku-4-5:

    - zed: one big call (the most tokens by far);
    - amy: a repeatable call and its cache hit (day 1), a Claude call, a call retried after a
      429 and its repeat refused by the loop detector (day 2); one outcome on day 1;
    - bob: a call refused by his $1 budget (its max_tokens alone could cost $2) and a normal
      call (day 2); an outcome counted twice on day 2;
    - carol: one call an hour ago.
    """
    path = tmp_path_factory.mktemp("ledger") / "ledger.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-empty")))
        _tokens._reset_for_tests()
        clock = Clock(DAY1)
        fake = FakeLLM(Reply(input_tokens=100, output_tokens=10))
        guard = tokenguard.Guard(
            store=f"sqlite:///{path}",
            clock=clock,
            cache=tokenguard.Cache("memory"),
            retry=tokenguard.Retry(initial_delay_s=0.001),
            loops=tokenguard.LoopDetector(max_repeats=1, count_cache_hits=False),
            budgets=[tokenguard.Budget(limit_usd=1, period="total", per="user")],
        )
        openai_client = fake.openai(guard=guard)
        anthropic_client = fake.anthropic(guard=guard)
        with tokenguard.scope(user="zed", project="alpha"):
            fake.reply(input_tokens=40_000, output_tokens=4_000)
            chat(openai_client, "the big one")
        with tokenguard.scope(user="amy", project="alpha"):
            chat(openai_client, "a repeatable question", temperature=0)
            chat(openai_client, "a repeatable question", temperature=0)  # answered by the cache
        tokenguard.record_outcome("answer_accepted", guard=guard, user="amy", project="alpha")
        clock.now = DAY2
        with tokenguard.scope(user="amy", project="beta"):
            anthropic_client.messages.create(
                model="claude-haiku-4-5", max_tokens=50, messages=[{"role": "user", "content": "hello"}]
            )
            fake.queue(ErrorReply(429, headers={"retry-after-ms": "1"}), Reply(input_tokens=100, output_tokens=10))
            chat(openai_client, "retried once")
            with pytest.raises(tokenguard.LoopDetected):
                chat(openai_client, "retried once")
        with tokenguard.scope(user="bob", project="beta"):
            with pytest.raises(tokenguard.BudgetExceeded):
                chat(openai_client, "write a book", max_tokens=200_000)
            chat(openai_client, "a short one")
        tokenguard.record_outcome("ticket_resolved", 2, guard=guard, user="bob", project="beta")
        clock.now = datetime.now(UTC) - timedelta(hours=1)
        with tokenguard.scope(user="carol", project="alpha"):
            chat(openai_client, "recent")
        guard.close()
        _tokens._reset_for_tests()
    store = SQLiteStore(path)
    rows, outcomes = list(store.rows()), list(store.outcomes())
    store.close()
    assert len(rows) == 9
    return Ledger(path, rows, outcomes)


def totals(rows: Iterable[tokenguard.LedgerRow], outcomes: Iterable[tokenguard.OutcomeRow]) -> dict[str, Any]:
    """What a report group must say about ``rows`` and ``outcomes``, added up independently."""
    rows, outcomes = list(rows), list(outcomes)
    spent = sum((r.cost_usd or Decimal(0) for r in rows), Decimal(0))
    blocked = [r for r in rows if r.outcome == "blocked"]
    return {
        "calls": len(rows),
        "cache_hits": sum(r.outcome == "cache_hit" for r in rows),
        "spent_usd": spent,
        "saved_usd": sum((r.saved_usd or Decimal(0) for r in rows), Decimal(0)),
        "input_tokens": sum(r.usage.input_tokens for r in rows),
        "output_tokens": sum(r.usage.output_tokens for r in rows),
        "retries": sum(max(r.attempts - 1, 0) for r in rows),
        "loops_blocked": sum(r.error == "loop" for r in blocked),
        "budget_blocks": sum(r.error == "budget" for r in blocked),
        "outcomes": sum(o.count for o in outcomes),
    }


def check_group(got: Mapping[str, Any], want: Mapping[str, Any]) -> None:
    """A JSON / CSV group against ``totals()``: counts equal, money exact, cost per outcome
    the spend over the outcomes."""
    for name in ("calls", "cache_hits", "input_tokens", "output_tokens", "retries", "loops_blocked"):
        assert int(got[name]) == want[name], name
    assert int(got["budget_blocks"]) == want["budget_blocks"]
    assert int(got["outcomes"]) == want["outcomes"]
    assert Decimal(got["spent_usd"]) == want["spent_usd"]
    assert Decimal(got["saved_usd"]) == want["saved_usd"]
    cost = got["cost_per_outcome_usd"]
    if want["outcomes"] and want["calls"]:
        exact = want["spent_usd"] / want["outcomes"]
        step = Decimal(1).scaleb(Decimal(cost).as_tuple().exponent)  # type: ignore[arg-type]
        assert step <= Decimal("0.000001")  # at least micro-dollars
        assert abs(Decimal(cost) - exact) <= step / 2
    else:
        assert cost in (None, "")


def report_json(ledger: Ledger, *args: str) -> dict[str, Any]:
    """``tokenguard report --format json ARGS`` on the ledger, parsed."""
    data: dict[str, Any] = json.loads(ok(invoke("report", "--store", ledger.url, "--format", "json", *args)))
    return data


def by(key: str) -> Callable[[Any], str]:
    """The label of a ledger or outcome row for grouping by ``key`` (a UTC day, or a scope attribute)."""
    if key == "day":
        return lambda r: r.ts.astimezone(UTC).date().isoformat()
    return lambda r: r.scope.get(key, "(none)")


# -- report ----------------------------------------------------------------------------------------


def test_ledger_has_every_kind_of_row(ledger: Ledger) -> None:
    """The fixture ledger holds what the report tests rely on: a hit, a retry, a loop block, a
    budget block, three outcomes, and zed with the most tokens."""
    assert [r.outcome for r in ledger.rows].count("cache_hit") == 1
    assert sorted(r.error for r in ledger.rows if r.outcome == "blocked") == ["budget", "loop"]
    assert [r.attempts for r in ledger.rows].count(2) == 1
    assert sum(o.count for o in ledger.outcomes) == 3
    tokens = {
        u: sum(r.usage.input_tokens + r.usage.output_tokens for r in ledger.rows if r.scope["user"] == u) for u in USERS
    }
    assert max(tokens, key=tokens.__getitem__) == "zed"
    zed = next(r for r in ledger.rows if r.scope["user"] == "zed")
    assert zed.cost_usd == Decimal("0.14")  # 40,000 in at $2.5/M + 4,000 out at $10/M


def test_report_table_shows_each_user_and_the_total(ledger: Ledger) -> None:
    """The default table (by user), wide: one row per user and the (all) total with calls, hits,
    spend, savings, tokens, retries, loops, budget blocks, outcomes and cost per outcome; then the
    summary line."""
    out = ok(invoke("report", "--store", ledger.url))
    table = report_table(out)
    assert list(table) == [*USERS, "(all)"]
    for name, cells in table.items():
        rows = ledger.rows if name == "(all)" else [r for r in ledger.rows if r.scope["user"] == name]
        outcomes = ledger.outcomes if name == "(all)" else [o for o in ledger.outcomes if o.scope["user"] == name]
        want = totals(rows, outcomes)
        assert cells["calls"] == str(want["calls"])
        assert cells["hits"] == str(want["cache_hits"])
        assert cells["spent"] == usd4(want["spent_usd"])
        assert cells["saved"] == usd4(want["saved_usd"])
        assert cells["tokens"] == f"{want['input_tokens'] + want['output_tokens']:,}"
        assert cells["retries"] == str(want["retries"])
        assert cells["loops"] == str(want["loops_blocked"])
        assert cells["budget blocks"] == str(want["budget_blocks"])
        assert cells["outcomes"] == (str(want["outcomes"]) if want["outcomes"] else "-")
        per = usd4(want["spent_usd"] / want["outcomes"]) if want["outcomes"] else "-"
        assert cells["$/outcome"] == per
    everything = totals(ledger.rows, ledger.outcomes)
    assert f"spent {usd4(everything['spent_usd'])} · saved by the cache {usd4(everything['saved_usd'])}" in out
    assert "retries 1 · loops stopped 1 · budget blocks 1" in out


def test_report_reads_the_store_from_the_environment(ledger: Ledger) -> None:
    """Without --store, TOKENGUARD_STORE names the ledger."""
    data = json.loads(ok(invoke("report", "--format", "json", env={"TOKENGUARD_STORE": ledger.url})))
    assert data["total"]["calls"] == len(ledger.rows)


@pytest.mark.parametrize("command", [["report", "--format", "json"], ["cache", "stats"], ["ledger", "check"]])
def test_commands_read_the_store_from_tokenguard_toml(
    ledger: Ledger, command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --store or TOKENGUARD_STORE, each command reads the ``store`` of tokenguard.toml, as a guard would."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokenguard.toml").write_text(f'store = "{ledger.url}"\ncache = "disk"\n')
    if command[0] == "cache":
        command = [*command, "--path", str(tmp_path / "cache")]
    result = invoke(*command, env={"TOKENGUARD_STORE": None})
    out = ok(result)
    if command[0] == "report":
        assert json.loads(out)["total"]["calls"] == len(ledger.rows)
    elif command[0] == "cache":
        assert f"of {len(ledger.rows) - 2:,} answers" in out  # answered: calls less one block each of two kinds
    else:
        assert out.strip() == f"{ledger.path}: ok"


def test_a_blank_tokenguard_store_is_an_error_naming_it(ledger: Ledger) -> None:
    """TOKENGUARD_STORE set but blank: the commands and Guard() both say so, naming the variable."""
    assert "TOKENGUARD_STORE" in user_error(invoke("report", env={"TOKENGUARD_STORE": " "}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENGUARD_STORE", " ")
        with pytest.raises(tokenguard.ConfigurationError, match="TOKENGUARD_STORE"):
            tokenguard.Guard()


def test_report_groups_are_in_key_order_not_ranked_by_tokens(ledger: Ledger) -> None:
    """Groups come out in name order (zed, with the most tokens, last) in every format."""
    data = report_json(ledger)
    assert [g["user"] for g in data["groups"]] == USERS
    table = ok(invoke("report", "--store", ledger.url)).splitlines()
    positions = [next(i for i, line in enumerate(table) if line.strip().startswith(user)) for user in USERS]
    assert positions == sorted(positions)
    rows = list(csv.DictReader(io.StringIO(ok(invoke("report", "--store", ledger.url, "--format", "csv")))))
    assert [r["user"] for r in rows] == USERS


def test_report_json_by_user_adds_up_the_ledger(ledger: Ledger) -> None:
    """Per user: calls, spend (exactly the sum of the rows' cost), hits, retries, loop and
    budget blocks, outcomes and cost per outcome; and the same for the total."""
    data = report_json(ledger)
    assert data["by"] == ["user"]
    for group in data["groups"]:
        user = group["user"]
        check_group(
            group,
            totals(
                [r for r in ledger.rows if r.scope["user"] == user],
                [o for o in ledger.outcomes if o.scope["user"] == user],
            ),
        )
    check_group(data["total"], totals(ledger.rows, ledger.outcomes))
    amy, bob = data["groups"][0], data["groups"][1]
    assert (amy["cache_hits"], amy["retries"], amy["loops_blocked"], amy["outcomes"]) == (1, 1, 1, 1)
    assert (bob["budget_blocks"], bob["outcomes"]) == (1, 2)
    assert Decimal(bob["cost_per_outcome_usd"]) == Decimal(bob["spent_usd"]) / 2


def test_report_json_money_is_exact_strings(ledger: Ledger) -> None:
    """Every money value in the JSON is a string holding the exact decimal."""
    data = report_json(ledger, "--by", "day")
    for group in [*data["groups"], data["total"]]:
        for name in ("spent_usd", "saved_usd"):
            assert isinstance(group[name], str)
            Decimal(group[name])
        assert group["cost_per_outcome_usd"] is None or isinstance(group["cost_per_outcome_usd"], str)
    for day in data["daily"]:
        assert isinstance(day["spent_usd"], str)
    assert Decimal(data["total"]["spent_usd"]) == sum((r.cost_usd or Decimal(0) for r in ledger.rows), Decimal(0))


def test_report_by_project_and_model(ledger: Ledger) -> None:
    """--by project,model: one group per (project, model) in key order, each adding up its rows;
    outcomes belong to no model, so they count only in the total."""
    data = report_json(ledger, "--by", "project,model")
    assert data["by"] == ["project", "model"]
    keys = sorted({(r.scope["project"], r.model) for r in ledger.rows})
    assert [(g["project"], g["model"]) for g in data["groups"]] == keys
    assert ("beta", "claude-haiku-4-5") in keys
    for group in data["groups"]:
        rows = [r for r in ledger.rows if (r.scope["project"], r.model) == (group["project"], group["model"])]
        check_group(group, totals(rows, []))
    check_group(data["total"], totals(ledger.rows, ledger.outcomes))


def test_report_by_day(ledger: Ledger) -> None:
    """--by day: one group per UTC day with calls, spend and the outcomes recorded that day."""
    data = report_json(ledger, "--by", "day")
    days = sorted({by("day")(r) for r in ledger.rows})
    assert [g["day"] for g in data["groups"]] == days
    assert days[:2] == ["2025-06-01", "2025-06-02"]
    for group in data["groups"]:
        rows = [r for r in ledger.rows if by("day")(r) == group["day"]]
        outcomes = [o for o in ledger.outcomes if by("day")(o) == group["day"]]
        check_group(group, totals(rows, outcomes))
    assert [g["outcomes"] for g in data["groups"]][:2] == [1, 2]


def test_report_csv_has_the_json_numbers(ledger: Ledger) -> None:
    """--format csv parses with the csv module: a header, then one row per group with the same
    numbers as the JSON (empty cost per outcome where there are no outcomes)."""
    text = ok(invoke("report", "--store", ledger.url, "--by", "project,model", "--format", "csv"))
    rows = list(csv.DictReader(io.StringIO(text)))
    groups = report_json(ledger, "--by", "project,model")["groups"]
    assert len(rows) == len(groups)
    for row, group in zip(rows, groups, strict=True):
        assert set(row) == set(group)
        for name, value in group.items():
            assert row[name] == ("" if value is None else str(value)), name
        rows_of = [r for r in ledger.rows if (r.scope["project"], r.model) == (row["project"], row["model"])]
        check_group(row, totals(rows_of, []))


def test_report_since_until_iso(ledger: Ledger) -> None:
    """--since (inclusive) and --until (exclusive) with ISO dates keep only the rows in between."""
    data = report_json(ledger, "--since", "2025-06-02", "--until", "2025-06-03")
    day2 = [r for r in ledger.rows if by("day")(r) == "2025-06-02"]
    check_group(data["total"], totals(day2, [o for o in ledger.outcomes if by("day")(o) == "2025-06-02"]))
    assert data["since"].startswith("2025-06-02T00:00:00")
    assert [g["user"] for g in data["groups"]] == ["amy", "bob"]
    before = report_json(ledger, "--until", "2025-06-02T00:00")
    assert before["total"]["calls"] == sum(r.ts < DAY2.replace(hour=0) for r in ledger.rows)


def test_report_since_a_span(ledger: Ledger) -> None:
    """--since 7d keeps only the last seven days (carol's call of an hour ago); the table
    title shows the period."""
    data = report_json(ledger, "--since", "7d")
    assert [g["user"] for g in data["groups"]] == ["carol"]
    check_group(data["total"], totals([r for r in ledger.rows if r.scope["user"] == "carol"], []))
    out = ok(invoke("report", "--store", ledger.url, "--since", "12h"))
    assert "→ now UTC" in out
    assert "carol" in out
    assert "zed" not in out


@pytest.mark.parametrize("option", ["--since", "--until"])
@pytest.mark.parametrize("value", ["yesterday", "2025-13-01", "7w", "d7"])
def test_report_bad_date_is_one_line_exit_2(ledger: Ledger, option: str, value: str) -> None:
    """A bad --since / --until: exit 2, one line naming the option and the value, no traceback."""
    message = user_error(invoke("report", "--store", ledger.url, option, value))
    assert option in message
    assert value in message


@pytest.mark.parametrize("grouping", ["bad name", "user,user", "us-er"])
def test_report_bad_by_is_one_line_exit_2(ledger: Ledger, grouping: str) -> None:
    """--by with an attribute that is not an identifier, or named twice: exit 2, one line."""
    message = user_error(invoke("report", "--store", ledger.url, "--by", grouping))
    assert "by" in message


def test_report_bad_by_names_the_option_and_the_name(ledger: Ledger) -> None:
    """The --by error names the option (--by) and quotes the bad attribute name, not a placeholder."""
    message = user_error(invoke("report", "--store", ledger.url, "--by", "bad name"))
    assert "--by" in message
    assert "'x'" not in message


def test_report_bad_store_is_one_line_exit_2() -> None:
    """An unknown store URL: exit 2, one line, and a password in it is not printed."""
    message = user_error(invoke("report", "--store", "redis://me:hunter2@cache:6379/0"))
    assert "hunter2" not in message
    message = user_error(invoke("report", "--store", "nonsense"))
    assert "store" in message


def test_report_narrow_terminal_keeps_the_money(ledger: Ledger) -> None:
    """On an 80-column console the table drops the tokens/retries/loops/blocks columns (all but tokens stay in the
    summary) and keeps every user's full spend."""
    out = ok(invoke("report", "--store", ledger.url, columns=80))
    table = report_table(out)
    columns = list(table["amy"])
    assert columns[0] == "user"
    assert {"calls", "spent", "saved", "$/outcome"} <= set(columns)  # the money comes first
    assert "tokens" not in columns  # the lowest priority does not fit in 80 columns
    assert columns[-1] == "$/outcome"
    for user in USERS:
        want = totals([r for r in ledger.rows if r.scope["user"] == user], [])
        assert table[user]["spent"] == usd4(want["spent_usd"])
    assert "…" not in out
    assert "budget blocks 1" in " ".join(out.split())  # the summary (wrapped at 80 columns)


def test_report_narrow_terminal_keeps_the_group_names(ledger: Ledger) -> None:
    """On a 60-column console, each row of --by project,model still shows its project."""
    out = ok(invoke("report", "--store", ledger.url, "--by", "project,model", columns=60))
    assert "alpha" in out
    assert "beta" in out


def test_report_html_writes_the_file(ledger: Ledger, tmp_path: Path) -> None:
    """--html FILE writes a self-contained HTML page next to the normal output and says so."""
    pytest.importorskip("tokenguard._html")
    target = tmp_path / "report.html"
    result = invoke("report", "--store", ledger.url, "--html", str(target))
    out = ok(result)
    assert "amy" in out  # the table is still printed
    assert f"wrote {target}" in result.output.replace("\n", "")
    page = target.read_text(encoding="utf-8")
    assert "<html" in page.lower()
    for user in USERS:
        assert user in page
    json_run = invoke("report", "--store", ledger.url, "--format", "json", "--html", str(tmp_path / "2.html"))
    assert json.loads(ok(json_run))["total"]["calls"] == len(ledger.rows)  # stdout stays pure JSON
    assert (tmp_path / "2.html").is_file()


def test_report_html_to_a_missing_directory_is_one_line_exit_2(ledger: Ledger, tmp_path: Path) -> None:
    """--html into a directory that does not exist is a user's mistake: one line, exit 2."""
    pytest.importorskip("tokenguard._html")
    message = user_error(invoke("report", "--store", ledger.url, "--html", str(tmp_path / "no" / "r.html")))
    assert "r.html" in message


# -- budgets ---------------------------------------------------------------------------------------

BUDGET_TOML = '[[budgets]]\nlimit_usd = 1\nperiod = "day"\nper = "user"\n'


@pytest.fixture
def budget_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tokenguard.toml with a $1/day per-user budget in the working directory, and a ledger
    where carol spent $0.35 and dave $0.70 today, through a guard built from that configuration."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokenguard.toml").write_text(BUDGET_TOML, encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    kwargs = load_config().guard_kwargs()
    kwargs.update(store=url, retry=False)
    guard = tokenguard.Guard(**kwargs)
    client = FakeLLM(Reply(input_tokens=100_000, output_tokens=10_000)).openai(guard=guard)  # $0.35 a call
    for user in ("carol", "dave", "dave"):
        with tokenguard.scope(user=user):
            chat(client, "hi", max_tokens=20)
    guard.close()
    return url


def test_budgets_table_has_one_row_per_user(budget_ledger: str) -> None:
    """One row per user that spent today: the budget, spend, limit, % used and time to reset."""
    out = ok(invoke("budgets", "--store", budget_ledger))
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]
    assert [r[:6] for r in rows] == [
        ["$1/day per user", "carol", "$0.3500", "$0.0000", "$1.00", "35%"],
        ["$1/day per user", "dave", "$0.7000", "$0.0000", "$1.00", "70%"],
    ]
    for row in rows:
        assert re.fullmatch(r"\d+h \d+m", row[6])
    assert "store: sqlite:///" in " ".join(out.split())


def test_budgets_json(budget_ledger: str) -> None:
    """--format json: one object per user with exact money strings and the reset time."""
    data = json.loads(ok(invoke("budgets", "--store", budget_ledger, "--format", "json")))
    assert [d["key"] for d in data] == ["carol", "dave"]
    for entry, spent in zip(data, ("0.35", "0.70"), strict=True):
        assert entry["budget"] == "$1/day per user"
        assert isinstance(entry["spent_usd"], str)
        assert Decimal(entry["spent_usd"]) == Decimal(spent)
        assert Decimal(entry["held_usd"]) == 0
        assert entry["limit_usd"] == "1"
        assert entry["limit_tokens"] is None
        assert datetime.fromisoformat(entry["resets_at"]) > datetime.now(UTC)
    assert data[1]["spent_tokens"] == 220_000


def test_budgets_reads_the_store_from_the_environment(budget_ledger: str) -> None:
    """Without --store, TOKENGUARD_STORE names the ledger."""
    data = json.loads(ok(invoke("budgets", "--format", "json", env={"TOKENGUARD_STORE": budget_ledger})))
    assert len(data) == 2


def test_budgets_without_configuration_gives_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No budgets configured: a friendly hint with an example, exit 0; JSON is an empty list."""
    monkeypatch.chdir(tmp_path)
    out = ok(invoke("budgets", "--store", "memory://"))
    assert "No budgets are configured" in out
    assert "limit_usd = 50" in out
    assert json.loads(ok(invoke("budgets", "--store", "memory://", "--format", "json"))) == []


def test_budgets_hint_is_valid_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hint's example shows the [[budgets]] table header."""
    monkeypatch.chdir(tmp_path)
    assert "[[budgets]]" in ok(invoke("budgets", "--store", "memory://"))


def test_budgets_configured_but_unused_is_not_called_unconfigured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configured per-user budget with no spend yet is not reported as missing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokenguard.toml").write_text(BUDGET_TOML, encoding="utf-8")
    assert "No budgets are configured" not in ok(invoke("budgets", "--store", "memory://"))


def test_budgets_bad_configuration_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget with a bad period: exit 2 naming the budgets key and its file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokenguard.toml").write_text('[[budgets]]\nlimit_usd = 1\nperiod = "fortnight"\n', encoding="utf-8")
    message = user_error(invoke("budgets", "--store", "memory://"))
    assert "budgets (tokenguard.toml)" in message
    assert "fortnight" in message


# -- cache -----------------------------------------------------------------------------------------


@pytest.fixture
def disk_cache(tmp_path: Path) -> tuple[Path, str]:
    """A disk cache with two answers, and a ledger with one hit on it."""
    directory = tmp_path / "cache"
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    response_cache = tokenguard.Cache("disk", path=directory)
    guard = tokenguard.Guard(store=url, cache=response_cache, retry=False)
    client = FakeLLM().openai(guard=guard)
    for content in ("first", "second", "first"):
        chat(client, content, temperature=0)
    guard.close()
    response_cache.close()
    return directory, url


def test_cache_stats_counts_entries_and_hits(disk_cache: tuple[Path, str]) -> None:
    """cache stats: the directory, its entries, and the hits and savings in the ledger."""
    directory, url = disk_cache
    out = ok(invoke("cache", "stats", "--path", str(directory), "--store", url))
    assert str(directory) in out
    assert re.search(r"entries\s+2\b", out)
    assert re.search(r"hits\s+1 of 3 answers \(33%\)", out)
    store = SQLiteStore(url.removeprefix("sqlite:///"))
    saved = sum((r.saved_usd or Decimal(0) for r in store.rows()), Decimal(0))
    store.close()
    assert saved > 0
    assert re.search(rf"saved\s+{re.escape(usd4(saved))}", out)


def test_cache_clear_asks_first(disk_cache: tuple[Path, str]) -> None:
    """cache clear without --yes asks; answering n aborts and keeps every entry."""
    directory, url = disk_cache
    result = invoke("cache", "clear", "--path", str(directory), input="n\n")
    assert result.exit_code == 1
    assert "Drop every entry" in result.output
    assert "Aborted" in result.output
    assert re.search(r"entries\s+2\b", ok(invoke("cache", "stats", "--path", str(directory), "--store", url)))


def test_cache_clear_yes_empties_it(disk_cache: tuple[Path, str]) -> None:
    """cache clear --yes drops every entry (answering y does too); the ledger keeps its rows."""
    directory, url = disk_cache
    assert f"cleared {directory}" in ok(invoke("cache", "clear", "--path", str(directory), "--yes"))
    out = ok(invoke("cache", "stats", "--path", str(directory), "--store", url))
    assert re.search(r"entries\s+0\b", out)
    assert re.search(r"hits\s+1 of 3", out)
    assert "cleared" in ok(invoke("cache", "clear", "--path", str(directory), input="y\n"))


def test_cache_stats_shows_the_configured_size_bound(disk_cache: tuple[Path, str]) -> None:
    """cache stats shows the size bound the configuration sets (TOKENGUARD_CACHE_MAX_SIZE_MB)."""
    directory, _ = disk_cache
    out = ok(invoke("cache", "stats", "--path", str(directory), env={"TOKENGUARD_CACHE_MAX_SIZE_MB": "100"}))
    assert "of 100 MB at most" in out


# -- prices ----------------------------------------------------------------------------------------


def test_prices_gpt_4o() -> None:
    """prices gpt-4o: input $2.5 and output $10 per 1M tokens, as genai-prices has them."""
    card = PriceBook().card("openai", "gpt-4o")
    assert card is not None
    assert (card.model_price.input_mtok, card.model_price.output_mtok) == (Decimal("2.5"), Decimal(10))
    out = ok(invoke("prices", "gpt-4o"))
    assert "openai gpt-4o" in out
    assert "$2.5 " in row_of(out, "input")
    assert "$10 " in row_of(out, "output")
    assert f"${card.model_price.cache_read_mtok} " in row_of(out, "cached input (read)")
    assert f"{card.context_window:,} tokens" in out


def test_prices_show_tiers() -> None:
    """prices claude-sonnet-4-5: base prices and the higher price above the tier, per row."""
    card = PriceBook().card("anthropic", "claude-sonnet-4-5")
    assert card is not None
    out = ok(invoke("prices", "claude-sonnet-4-5"))
    assert "anthropic claude-sonnet-4-5" in out
    for label, price in (
        ("input", card.model_price.input_mtok),
        ("output", card.model_price.output_mtok),
        ("cache write (1 h)", card.model_price.cache_write_1h_mtok),
    ):
        line = row_of(out, label)
        assert f"${price.base} " in line
        tier = price.tiers[0]
        assert f"${tier.price} from {tier.start:,}" in line


def test_prices_vendor_option() -> None:
    """--vendor azure prices an OpenAI model as served by Azure; a wrong vendor is an error."""
    assert "azure gpt-4o" in ok(invoke("prices", "gpt-4o", "--vendor", "azure"))
    assert "gpt-4o" in user_error(invoke("prices", "gpt-4o", "--vendor", "anthropic"))


def test_prices_unknown_model_is_one_line_exit_2() -> None:
    """An unknown model: exit 2, one line naming it."""
    assert "'tg-no-such-model'" in user_error(invoke("prices", "tg-no-such-model"))


# -- estimate --------------------------------------------------------------------------------------

PROMPT = "Summarise this report please"  # 77 tokens at most: $0.0051925 with 500 out


def worst_case_in(output: str) -> Decimal:
    """The worst case ``tokenguard estimate`` printed."""
    found = re.search(r"worst case \$([\d,.]+)", output)
    assert found, output
    return Decimal(found.group(1).replace(",", ""))


def reserved_for(prompt: str, max_tokens: int) -> Decimal:
    """What a budget reserves for this chat request: the needed amount of the BudgetExceeded a
    tiny budget raises (nothing is sent)."""
    guard = tokenguard.Guard(store="memory://", retry=False, budgets=[tokenguard.Budget(limit_usd="0.000001")])
    fake = FakeLLM()
    with pytest.raises(tokenguard.BudgetExceeded) as refused:
        chat(fake.openai(guard=guard), prompt, max_tokens=max_tokens)
    assert fake.money_requests == []
    guard.close()
    return refused.value.needed_usd


def test_estimate_is_what_a_budget_reserves() -> None:
    """estimate --model gpt-4o --max-tokens 500 PROMPT: the input bound of the request's bytes,
    the max_tokens output bound, and (to the printed micro-dollar) what a budget reserves."""
    out = ok(invoke("estimate", "--model", "gpt-4o", "--max-tokens", "500", PROMPT))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 500}
    bound = OpenAIAdapter().input_bound(CHAT, body)
    assert f"input   ≤ {bound:,} tokens" in out
    assert "output  ≤ 500 tokens (max_tokens)" in out
    reserved = reserved_for(PROMPT, 500)
    card = PriceBook().card("openai", "gpt-4o")
    assert card is not None
    assert reserved == card.worst_case(bound, 500)
    assert reserved.as_tuple().exponent < -6  # more places than printed: see the xfail below
    assert abs(worst_case_in(out) - reserved) <= Decimal("0.0000005")


def test_estimate_never_understates_the_reservation() -> None:
    """The printed worst case is never below what a budget reserves for the request."""
    out = ok(invoke("estimate", "--model", "gpt-4o", "--max-tokens", "500", PROMPT))
    assert worst_case_in(out) >= reserved_for(PROMPT, 500)


def test_estimate_from_a_request_file(tmp_path: Path) -> None:
    """--request FILE: model, max_tokens and messages come from the JSON body (an Anthropic one
    here): the worst case is the card's for the adapter's input bound and max_tokens."""
    body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": PROMPT}]}
    request = tmp_path / "request.json"
    request.write_text(json.dumps(body), encoding="utf-8")
    out = ok(invoke("estimate", "--request", str(request)))
    assert out.startswith("anthropic claude-sonnet-4-5")
    bound = AnthropicAdapter().input_bound(MESSAGES, body)
    card = PriceBook().card("anthropic", "claude-sonnet-4-5")
    assert card is not None
    assert f"input   ≤ {bound:,} tokens" in out
    assert "output  ≤ 100 tokens (max_tokens)" in out
    assert abs(worst_case_in(out) - card.worst_case(bound, 100)) <= Decimal("0.0000005")


def test_estimate_from_a_prompt_file_without_max_tokens(tmp_path: Path) -> None:
    """--file reads the prompt; without --max-tokens the output bound is the context window."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT, encoding="utf-8")
    out = ok(invoke("estimate", "--model", "gpt-4o", "--file", str(prompt)))
    card = PriceBook().card("openai", "gpt-4o")
    assert card is not None
    assert card.context_window
    assert f"output  ≤ {card.context_window:,} tokens (the context window)" in out
    with_argument = ok(invoke("estimate", "--model", "gpt-4o", PROMPT))
    assert worst_case_in(with_argument) == worst_case_in(out)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["estimate", PROMPT], "--model"),
        (["estimate", "--model", "gpt-4o"], "prompt"),
        (["estimate", "--model", "tg-no-such-model", PROMPT], "tg-no-such-model"),
    ],
    ids=["no-model", "no-prompt", "unknown-model"],
)
def test_estimate_mistakes_are_one_line_exit_2(args: list[str], named: str) -> None:
    """A missing model or prompt, or an unpriced model: exit 2, one line naming it."""
    assert named in user_error(invoke(*args))


@pytest.mark.parametrize(("content", "reason"), [("[1, 2]", "JSON object"), ("not json", "is not JSON")])
def test_estimate_bad_request_file_is_one_line_exit_2(tmp_path: Path, content: str, reason: str) -> None:
    """--request with a non-object or non-JSON body: exit 2 naming --request."""
    request = tmp_path / "request.json"
    request.write_text(content, encoding="utf-8")
    message = user_error(invoke("estimate", "--request", str(request)))
    assert "--request" in message
    assert reason in message


# -- config ----------------------------------------------------------------------------------------


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory and no TOKENGUARD_* variable but TOKENGUARD_STORE=memory://."""
    monkeypatch.chdir(tmp_path)
    for spec in KEYS.values():
        monkeypatch.delenv(spec.env, raising=False)
    monkeypatch.delenv("TOKENGUARD_CONFIG", raising=False)
    monkeypatch.setenv("TOKENGUARD_STORE", "memory://")
    return tmp_path


def write(path: Path, text: str) -> None:
    """Write a UTF-8 text file."""
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def four_sources(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """retry.attempts set in all three places (env wins), loops.max_repeats in the two files
    (tokenguard.toml wins), loops.window_s only in pyproject; the rest default."""
    write(
        config_dir / "pyproject.toml",
        '[project]\nname = "app"\n\n[tool.tokenguard]\nrequire_prices = false\n'
        "[tool.tokenguard.retry]\nattempts = 7\n[tool.tokenguard.loops]\nmax_repeats = 6\nwindow_s = 30\n",
    )
    write(config_dir / "tokenguard.toml", "[retry]\nattempts = 8\n[loops]\nmax_repeats = 5\n")
    monkeypatch.setenv("TOKENGUARD_RETRY_ATTEMPTS", "9")
    return config_dir


def test_config_json_shows_each_value_and_its_source(four_sources: Path) -> None:
    """config --format json: every key with its value and source; the environment beats
    tokenguard.toml, which beats [tool.tokenguard], which beats the default."""
    data = json.loads(ok(invoke("config", "--format", "json")))
    assert list(data) == list(KEYS)
    assert data["retry.attempts"] == {"value": 9, "source": "env TOKENGUARD_RETRY_ATTEMPTS"}
    assert data["loops.max_repeats"] == {"value": 5, "source": "tokenguard.toml"}
    assert data["loops.window_s"] == {"value": 30.0, "source": "pyproject.toml [tool.tokenguard]"}
    assert data["loops"] == {"value": True, "source": "tokenguard.toml"}  # the [loops] table
    assert data["otel"] == {"value": False, "source": "default"}
    assert data["retry.initial_delay_s"] == {"value": 0.5, "source": "default"}
    assert data["store"] == {"value": "memory://", "source": "env TOKENGUARD_STORE"}


def test_config_table_shows_each_value_and_its_source(four_sources: Path) -> None:
    """config (table): a row per key with the value, where it came from and its variable."""
    out = ok(invoke("config", columns=200))
    for key, value, source in (
        ("retry.attempts", "9", "env TOKENGUARD_RETRY_ATTEMPTS"),
        ("loops.max_repeats", "5", "tokenguard.toml"),
        ("otel", "False", "default"),
        ("store", "memory://", "env TOKENGUARD_STORE"),
        ("cache.path", "(unset)", "default"),
    ):
        cells = [c.strip() for c in re.split(r"\s{2,}", row_of(out, key).strip()) if c.strip()]
        assert cells == [key, value, source, KEYS[key].env]


def test_config_table_names_the_pyproject_table(four_sources: Path) -> None:
    """The table says a value came from pyproject.toml [tool.tokenguard], as the JSON does."""
    assert "pyproject.toml [tool.tokenguard]" in row_of(ok(invoke("config", columns=200)), "loops.window_s")


def test_config_names_the_file_config_points_to(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TOKENGUARD_CONFIG names the file read instead of ./tokenguard.toml, and is the source."""
    other = config_dir / "elsewhere" / "settings.toml"
    other.parent.mkdir()
    write(other, "otel = true\n")
    write(config_dir / "tokenguard.toml", "loops = true\n")
    monkeypatch.setenv("TOKENGUARD_CONFIG", str(other))
    data = json.loads(ok(invoke("config", "--format", "json")))
    assert data["otel"] == {"value": True, "source": str(other)}
    assert data["loops"]["source"] == "default"


@pytest.mark.parametrize(
    ("files", "env", "named"),
    [
        ({}, {"TOKENGUARD_RETRY_ATTEMPTS": "zero"}, "retry.attempts (env TOKENGUARD_RETRY_ATTEMPTS)='zero'"),
        ({"tokenguard.toml": "[retry]\nattempts = 0\n"}, {}, "retry.attempts (tokenguard.toml)=0"),
        ({"pyproject.toml": "[tool.tokenguard]\ncach = true\n"}, {}, "cach (pyproject.toml [tool.tokenguard])"),
        ({"tokenguard.toml": "[cache]\npth = '/tmp'\n"}, {}, "cache.pth (tokenguard.toml)"),
        ({}, {"TOKENGUARD_LOOPS": "sometimes"}, "loops (env TOKENGUARD_LOOPS)"),
        ({}, {"TOKENGUARD_BUDGETS": "{not json"}, "budgets (env TOKENGUARD_BUDGETS)"),
        ({}, {"TOKENGUARD_CONFIG": "/no/such/tokenguard.toml"}, "TOKENGUARD_CONFIG"),
        ({"tokenguard.toml": "store = [\n"}, {}, "tokenguard.toml"),
    ],
    ids=["env-int", "toml-range", "pyproject-unknown", "toml-unknown-nested", "env-bool", "env-json", "config", "toml"],
)
def test_config_invalid_is_one_line_naming_key_and_source(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str], env: dict[str, str], named: str
) -> None:
    """An invalid value, an unknown key or an unreadable file: exit 2, one line naming the key
    and where it was set."""
    for name, text in files.items():
        write(config_dir / name, text)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert named in user_error(invoke("config"))
    assert named in user_error(invoke("config", "--format", "json"))


def test_config_budget_with_an_unknown_field_is_one_line_exit_2(config_dir: Path) -> None:
    """A typo in a budget table ([[budgets]] limit = 1) is named like any other bad setting."""
    write(config_dir / "tokenguard.toml", '[[budgets]]\nlimit = 1\nperiod = "day"\n')
    assert "budgets (tokenguard.toml)" in user_error(invoke("config"))


WEBHOOK = "https://hooks.slack.com/services/T0000/B0000/s3cr3tT0ken?channel=ops"


def test_config_table_redacts_the_webhook(config_dir: Path) -> None:
    """The webhook URL's path and query (which hold its token) are not shown in the table."""
    write(config_dir / "tokenguard.toml", f'[alerts]\nwebhook = "{WEBHOOK}"\n')
    out = ok(invoke("config", columns=200))
    assert "hooks.slack.com" in row_of(out, "alerts.webhook")
    assert "s3cr3tT0ken" not in out
    assert "channel=ops" not in out


def test_config_json_redacts_the_webhook(config_dir: Path) -> None:
    """config --format json does not print the webhook's token either."""
    write(config_dir / "tokenguard.toml", f'[alerts]\nwebhook = "{WEBHOOK}"\n')
    assert "s3cr3tT0ken" not in ok(invoke("config", "--format", "json"))


# -- help ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["report"],
        ["budgets"],
        ["cache"],
        ["cache", "stats"],
        ["cache", "clear"],
        ["prices"],
        ["estimate"],
        ["config"],
    ],
    ids=lambda c: " ".join(c) or "tokenguard",
)
def test_help_shows_an_example(command: list[str]) -> None:
    """--help (and -h) of every command exits 0 with usage and an example of the command."""
    for flag in ("--help", "-h"):
        out = ok(invoke(*command, flag))
        assert out.startswith("Usage: ")
        assert "Examples:" in out
        examples = out.split("Examples:", 1)[1]
        assert f"tokenguard {' '.join(command)}".strip() in examples


def test_version() -> None:
    """--version prints the package version."""
    assert tokenguard.__version__ in ok(invoke("--version"))


def test_report_since_after_until_is_one_line_exit_2(ledger: Ledger) -> None:
    """--since at or after --until would silently report nothing: it is a mistake, said in one line."""
    result = invoke("report", "--store", ledger.url, "--since", "2026-11-02", "--until", "2026-11-01")
    assert result.exit_code == 2
    assert "--since" in result.output + (result.stderr if hasattr(result, "stderr") else "")
