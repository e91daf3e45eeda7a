"""The HTML report (``tokenguard report --html FILE``): a self-contained page with summary
cards, a spend-per-day SVG chart and the groups table, built from real guarded calls."""

from __future__ import annotations

import dataclasses
import itertools
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import tokenguard
from tokenguard._html import _ticks, format_usd, render_html
from tokenguard._redact import redact_url
from tokenguard._report import Report, build_report
from tokenguard.cli import main
from tokenguard.testing import FakeLLM, Reply

MODEL = "tg-html-model"  # priced below: 1,000 input + 100 output tokens cost exactly $0.004
DAY1 = datetime(2025, 6, 1, 10, 0, tzinfo=UTC)
NOW = datetime(2025, 6, 10, 12, 0, tzinfo=UTC)
VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"})


class Clock:
    """A settable UTC clock."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Setup:
    """A guard on a settable clock, and a fake OpenAI client using it."""

    def __init__(self, **guard_kw: Any) -> None:
        self.clock = Clock(DAY1)
        self.guard = tokenguard.Guard(store="memory://", retry=False, clock=self.clock, **guard_kw)
        self.guard.register_price(MODEL, input_mtok=3, output_mtok=10)
        self.client = FakeLLM(Reply(input_tokens=1000, output_tokens=100)).openai(guard=self.guard)

    def on(self, day: int) -> Setup:
        """Move the clock to ``day`` days after DAY1."""
        self.clock.now = DAY1 + timedelta(days=day)
        return self

    def call(self, user: str, n: int = 1, **extra: str) -> None:
        with tokenguard.scope(user=user, **extra):
            for _ in range(n):
                self.client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0
                )

    def outcome(self, user: str, count: int = 1, name: str = "answer_accepted") -> None:
        with tokenguard.scope(user=user):
            tokenguard.record_outcome(name, count, guard=self.guard)

    def report(self, **kw: Any) -> Report:
        kw.setdefault("now", NOW)
        return build_report(self.guard.store, **kw)


@pytest.fixture
def setup() -> Iterator[Setup]:
    made = Setup()
    yield made
    made.guard.close()


@pytest.fixture
def three_days(setup: Setup) -> Report:
    """alice: one call a day on June 1-3 and 3 outcomes; bob: two calls on June 3 and 1 outcome."""
    for day in range(3):
        setup.on(day).call("alice")
    setup.call("bob", 2)
    setup.outcome("alice", 3)
    setup.outcome("bob")
    return setup.report(by=["user"])


# -- reading the page back ----------------------------------------------------------------------


class Page(HTMLParser):
    """Parses the page: checks that tags balance, and collects the text, the tags seen and the
    rows of the groups table (each cell as (text, bold))."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.texts: list[str] = []
        self.rows: list[list[tuple[str, bool]]] = []
        self._in_groups = False
        self._cell: list[str] | None = None
        self._bold = False
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "table" and "groups" in (attributes.get("class") or ""):
            self._in_groups = True
        elif self._in_groups and tag == "tr":
            self.rows.append([])
        elif self._in_groups and tag in ("td", "th"):
            self._cell, self._bold = [], False
        elif self._cell is not None and tag == "strong":
            self._bold = True

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()
        if tag == "table":
            self._in_groups = False
        elif tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(("".join(self._cell).strip(), self._bold))
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.texts.append(data)
        if self._cell is not None:
            self._cell.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.texts).split())


def parse(page: str) -> Page:
    parsed = Page(page)
    assert parsed.errors == []
    return parsed


def svg(page: str) -> ET.Element:
    """The chart, parsed as XML (it must be well-formed on its own)."""
    start, end = page.index("<svg"), page.index("</svg>") + len("</svg>")
    return ET.fromstring(page[start:end])


def days_of(chart: ET.Element) -> list[ET.Element]:
    return [g for g in chart.iter("g") if g.get("class") == "day"]


def x_labels(chart: ET.Element) -> list[str]:
    return [t.text or "" for t in chart.iter("text") if t.get("class") == "x-label"]


def rect_height(day: ET.Element, kind: str) -> float:
    found = [r for r in day.iter("rect") if r.get("class") == kind]
    return float(found[0].get("height", "0")) if found else 0.0


# -- the page -------------------------------------------------------------------------------------


def test_page_parses_and_shows_totals_users_and_cost_per_outcome(three_days: Report) -> None:
    """The page is balanced HTML; the cards show the totals; the table has a row per user,
    the total row, and the cost per outcome in bold."""
    assert three_days.total.spent_usd == Decimal("0.020")
    page = render_html(three_days)
    assert page.startswith("<!DOCTYPE html>")
    parsed = parse(page)
    text = parsed.text
    assert "Total spent $0.02" in text
    assert "Cost per outcome $0.005" in text  # $0.020 / 4 outcomes
    assert "Calls 5" in text
    header, *body = parsed.rows
    assert [cell for cell, _ in header][:2] == ["User", "Calls"]
    assert header[-1][0] == "Cost per outcome"
    by_name = {row[0][0]: row for row in body}
    assert list(by_name) == ["alice", "bob", "Total"]
    alice, bob, total = by_name["alice"], by_name["bob"], by_name["Total"]
    assert [c for c, _ in alice[1:4]] == ["3", "0", "$0.01"]
    assert [c for c, _ in bob[1:4]] == ["2", "0", "$0.008"]
    assert alice[-1] == ("$0.004", True)  # $0.012 / 3, bold: the column to read
    assert bob[-1] == ("$0.008", True)
    assert total[-1] == ("$0.005", True)
    assert total[5][0].startswith("5,500")  # tokens: 5 x (1,000 + 100)
    assert "tokenguard.record_outcome()" in text


def test_chart_has_one_bar_per_day_scaled_to_the_spend(three_days: Report) -> None:
    """One bar per day, heights proportional to the day's spend (June 3 spent 3x June 1),
    a title, a description, a legend and dollar ticks reaching the highest day."""
    chart = svg(render_html(three_days))
    days = days_of(chart)
    assert [d.get("data-day") for d in days] == ["2025-06-01", "2025-06-02", "2025-06-03"]
    heights = [rect_height(d, "spent") for d in days]
    assert heights[0] > 0
    assert heights[0] == pytest.approx(heights[1])
    assert heights[2] == pytest.approx(3 * heights[0], rel=1e-3)
    tips = [d.findtext("title") for d in days]
    assert tips[2] == "Jun 3, 2025: $0.01 spent, $0.00 saved by the cache"
    assert chart.get("role") == "img"
    assert chart.findtext("title")
    assert "$0.02 spent" in (chart.findtext("desc") or "")
    legend = [g for g in chart.iter("g") if g.get("class") == "legend"]
    assert [t.text for t in legend[0].iter("text")] == ["Spent", "Saved by the cache"]
    ticks = [t.text or "" for t in chart.iter("text") if t.get("class") == "y-label"]
    values = [Decimal(t.lstrip("$").replace(",", "")) for t in ticks]
    assert values[0] == 0
    assert values == sorted(values)
    assert values[-1] >= Decimal("0.012")
    steps = {b - a for a, b in itertools.pairwise(values)}
    assert len(steps) == 1  # evenly spaced
    assert x_labels(chart) == ["Jun 1", "Jun 2", "Jun 3"]


def test_days_without_calls_get_an_empty_bar(setup: Setup) -> None:
    """The chart is a time axis: June 2 and 3 (no calls) appear, with no spend bar."""
    setup.call("alice")
    setup.on(3).call("alice")
    chart = svg(render_html(setup.report()))
    days = days_of(chart)
    assert [d.get("data-day") for d in days] == ["2025-06-01", "2025-06-02", "2025-06-03", "2025-06-04"]
    assert [rect_height(d, "spent") > 0 for d in days] == [True, False, False, True]
    assert days[1].findtext("title") == "Jun 2, 2025: no calls"


def test_the_period_fills_the_chart_and_is_named(setup: Setup) -> None:
    """With --since/--until the chart spans the whole period, and the header names it."""
    setup.on(1).call("alice")
    report = setup.report(since=DAY1.replace(hour=0), until=datetime(2025, 6, 8, tzinfo=UTC))
    page = render_html(report)
    assert len(days_of(svg(page))) == 7  # June 1 to 7
    text = parse(page).text
    assert "Period 2025-06-01 to 2025-06-08 UTC (end excluded)" in text
    assert "(1 with calls)" in text  # the quiet days are charted, not counted as days with calls
    assert "Generated 2025-06-10 12:00 UTC" in text
    assert "Period All time" in parse(render_html(setup.report())).text


def test_cache_savings_are_shown_in_the_cards_chart_and_table() -> None:
    """A cache hit shows up as money saved, the share of answers from the cache, and a saved
    segment stacked on the day's bar."""
    made = Setup(cache=tokenguard.Cache("memory"))
    made.call("alice", 2)  # the second is answered from the cache
    report = made.report()
    made.guard.close()
    assert report.total.cache_hits == 1
    page = render_html(report)
    parsed = parse(page)
    assert "Saved by the cache $0.004 50% of answers came from the cache (1 of 2)" in parsed.text
    day = days_of(svg(page))[0]
    assert rect_height(day, "saved") == pytest.approx(rect_height(day, "spent"), rel=1e-3)
    alice = parsed.rows[1]
    assert [c for c, _ in alice[1:5]] == ["2", "1", "$0.004", "$0.004"]


def test_groups_keep_the_report_order_never_ranked_by_volume(setup: Setup) -> None:
    """zoe spends most, but the rows stay in key order (user, then day), as the report has them."""
    setup.call("zoe", 5)
    setup.call("amy")
    setup.on(1).call("zoe")
    report = setup.report(by=["user", "day"])
    parsed = parse(render_html(report))
    keys = [(row[0][0], row[1][0]) for row in parsed.rows[1:-1]]
    assert keys == [("amy", "2025-06-01"), ("zoe", "2025-06-01"), ("zoe", "2025-06-02")]
    assert keys == [g.key for g in report.groups]
    assert parsed.rows[-1][0][0] == "Total"
    assert '<th scope="row" colspan="2">Total</th>' in render_html(report)


def test_by_model_puts_the_cost_per_outcome_on_the_total_only(setup: Setup) -> None:
    """Outcomes belong to no model: the model rows have no cost per outcome, the total has it,
    and a note says why."""
    setup.call("alice", 2)
    setup.outcome("alice", 4)
    parsed = parse(render_html(setup.report(by=["model"])))
    model_row, total = parsed.rows[1], parsed.rows[-1]
    assert model_row[0][0] == MODEL
    assert model_row[-1] == ("—", False)
    assert total[-1] == ("$0.002", True)  # $0.008 / 4
    assert "the cost per outcome is on the total row only" in parsed.text


def test_outcomes_without_calls_do_not_show_a_free_cost_per_outcome(setup: Setup) -> None:
    """An outcome recorded under a narrower scope than its calls lands in a row with no calls:
    that row says so instead of a cost per outcome of $0.00."""
    setup.call("alice", project="x")
    setup.outcome("alice", 2)  # no project: the ("alice", "(none)") row
    parsed = parse(render_html(setup.report(by=["user", "project"])))
    rows = {(row[0][0], row[1][0]): row for row in parsed.rows[1:-1]}
    assert rows["alice", "(none)"][-1] == ("no calls", False)
    assert rows["alice", "x"][-1] == ("—", False)
    assert parsed.rows[-1][-1] == ("$0.002", True)


def test_no_grouping_shows_one_row_for_all_calls(setup: Setup) -> None:
    """``--by ''``: a single "All calls" row with the totals."""
    setup.call("alice", 2)
    parsed = parse(render_html(setup.report(by=[])))
    assert [row[0][0] for row in parsed.rows] == ["", "All calls"]
    assert parsed.rows[-1][1:4] == [("2", False), ("0", False), ("$0.008", False)]


def test_ledger_values_are_escaped(setup: Setup) -> None:
    """Scope values, outcome names and the store URL are text, never markup."""
    hostile = "<script>alert(1)</script>"
    img = '"><img src=x onerror=alert(1)>'
    setup.call(hostile, project=img)
    setup.outcome(hostile, name="<b>win</b>")
    report = dataclasses.replace(setup.report(by=["user", "project"]), store="memory://<script>x</script>")
    page = render_html(report)
    parsed = parse(page)
    assert not [tag for tag, _ in parsed.tags if tag in ("script", "img", "b")]
    assert not [attrs for _, attrs in parsed.tags if any(name.startswith("on") for name in attrs)]
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    row = parsed.rows[1]
    assert (row[0][0], row[1][0]) == (hostile, img)  # shown as the text it is
    assert "<b>win</b> 1" in parsed.text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@cache.internal:6379/0", "redis://***@cache.internal:6379/0"),
        ("postgresql://admin:s3cret@db.internal/ledger", "postgresql://***@db.internal/ledger"),
        (
            "rediss://default:s3cret@redis.internal:6380?ssl_cert_reqs=none&password=s3cret",
            "rediss://***@redis.internal:6380?***",
        ),
        ("sqlite:////var/lib/app/ledger.db", "sqlite:////var/lib/app/ledger.db"),
        ("memory://", "memory://"),
    ],
)
def test_store_url_is_shown_without_credentials(three_days: Report, url: str, shown: str) -> None:
    """The store URL is shown without its userinfo (and without a query string that may carry one)."""
    assert redact_url(url) == shown
    page = render_html(dataclasses.replace(three_days, store=url))
    assert "s3cret" not in page
    assert f"Store {shown}" in parse(page).text


def test_an_empty_report_says_so(setup: Setup) -> None:
    """No calls: zero cards, a friendly message instead of a chart and of a table."""
    report = setup.report()
    assert report.daily == []
    assert report.groups == []
    page = render_html(report)
    parsed = parse(page)
    assert "<svg" not in page
    assert "No calls in this period — nothing to chart yet." in parsed.text
    assert "Total spent $0.00" in parsed.text
    assert "Cost per outcome — no outcomes recorded yet" in parsed.text
    assert parsed.rows == []


def test_one_day_is_one_bar_of_bounded_width(setup: Setup) -> None:
    """A single day: one bar, one date label, and not a bar as wide as the chart."""
    setup.call("alice", 3)
    chart = svg(render_html(setup.report()))
    (day,) = days_of(chart)
    spent = [r for r in day.iter("rect") if r.get("class") == "spent"]
    assert len(spent) == 1
    assert 0 < float(spent[0].get("width", "0")) <= 56
    assert x_labels(chart) == ["Jun 1"]


def test_a_year_of_days_has_thinned_labels(setup: Setup) -> None:
    """365 days: 365 bars, but only a dozen or so month labels, all inside the chart."""
    start = datetime(2025, 1, 1, 12, tzinfo=UTC)
    for i in range(365):
        setup.clock.now = start + timedelta(days=i)
        setup.call("alice")
    page = render_html(setup.report())
    chart = svg(page)
    assert len(days_of(chart)) == 365
    labels = x_labels(chart)
    assert labels == ["Jan 2025", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    width = float((chart.get("viewBox") or "").split()[2])
    xs = [float(t.get("x", "-1")) for t in chart.iter("text") if t.get("class") == "x-label"]
    assert all(20 < x < width - 20 for x in xs)
    assert xs == sorted(xs)
    parse(page)


def test_two_years_label_each_year_and_stay_thin(setup: Setup) -> None:
    """Beyond a year the month labels thin out further and name each year."""
    for day in (0, 400, 729):
        setup.clock.now = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(days=day)
        setup.call("alice")
    chart = svg(render_html(setup.report()))
    assert len(days_of(chart)) == 730
    labels = x_labels(chart)
    assert len(labels) <= 12
    assert "Jan 2024" in labels
    assert "Jan 2025" in labels


def test_the_page_is_self_contained_and_prints(three_days: Report) -> None:
    """No link to anything outside the file (fonts, scripts, stylesheets, images); the CSS is
    inline and has a print stylesheet that keeps the chart."""
    page = render_html(three_days)
    assert not re.search(r"https?://", page)
    for needle in ("<script", "<link", "<img", "<iframe", "@import", "url(", " src=", " href="):
        assert needle not in page.lower(), needle
    assert page.count("<style>") == 1
    start = page.index("{", page.index("@media print")) + 1
    block = page[start : page.index("\n}", start)]
    rules = dict(re.findall(r"([^{}]+)\{([^{}]*)\}", block))
    assert rules  # the print stylesheet has rules
    hidden = [selector.strip() for selector, body in rules.items() if re.search(r"display:\s*none", body)]
    assert hidden == ["details.daily"]  # the chart, cards and tables all print


def test_money_formatting() -> None:
    """Dollars with cents; amounts under a cent keep three significant digits; exact Decimal rounding."""
    assert format_usd(Decimal(0)) == "$0.00"
    assert format_usd(None) == "—"
    assert format_usd(Decimal("1234567.891")) == "$1,234,567.89"
    assert format_usd(Decimal("0.125")) == "$0.13"  # half up, not binary-float 0.12
    assert format_usd(Decimal("2.675")) == "$2.68"  # a float would say 2.67
    assert format_usd(Decimal("0.0105")) == "$0.01"
    assert format_usd(Decimal("0.00999")) == "$0.00999"
    assert format_usd(Decimal("0.0070000")) == "$0.007"
    assert format_usd(Decimal("0.004375")) == "$0.00438"
    assert format_usd(Decimal("0.0000025")) == "$0.0000025"
    assert format_usd(Decimal("1E-12")) == "<$0.00000001"
    assert format_usd(Decimal("-3.5")) == "-$3.50"


@pytest.mark.parametrize(
    ("peak", "expected"),
    [
        ("0.012", ["0", "0.005", "0.010", "0.015"]),
        ("7", ["0", "2", "4", "6", "8"]),
        ("1234.5", ["0", "500", "1000", "1500"]),
        ("0", ["0", "0.25", "0.50", "0.75", "1.00"]),
    ],
)
def test_y_ticks_are_round_numbers(peak: str, expected: list[str]) -> None:
    """Y-axis ticks: 0 to at least the peak in steps of 1, 2, 2.5 or 5 times a power of ten."""
    assert _ticks(Decimal(peak)) == [Decimal(e) for e in expected]


def test_cli_writes_the_html_file(tmp_path: Path) -> None:
    """``tokenguard report --html FILE`` writes this page for a real SQLite ledger."""
    store = f"sqlite:///{tmp_path / 'ledger.db'}"
    guard = tokenguard.Guard(store=store, retry=False, clock=Clock(DAY1), settle_delay_s=0)
    guard.register_price(MODEL, input_mtok=3, output_mtok=10)
    client = FakeLLM(Reply(input_tokens=1000, output_tokens=100)).openai(guard=guard)
    with tokenguard.scope(user="carol"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    guard.close()
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", "--store", store, "--html", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    parsed = parse(page)
    assert [row[0][0] for row in parsed.rows[1:]] == ["carol", "Total"]
    assert len(days_of(svg(page))) == 1
    assert date(2025, 6, 1).isoformat() in page
