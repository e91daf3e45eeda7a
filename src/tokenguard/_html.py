"""The HTML report (``tokenguard report --html FILE``): one self-contained page a manager can
open offline, print or mail — summary cards, a spend-over-time chart and the groups table.

Everything is in the one file: inline CSS, an inline SVG chart drawn here from
``Report.daily``, no fonts, scripts or images fetched from anywhere (hover details come
from SVG ``<title>`` tooltips, not JavaScript). Every value that comes from the ledger
(scope values, model names, outcome names, the store URL) is HTML-escaped, and the store
URL is shown without its userinfo (``redis://:password@host`` → ``redis://host``).

Money is ``Decimal`` throughout; it becomes a float only for pixel positions in the chart.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from importlib import metadata
from typing import Final

from ._redact import redact_url
from ._report import Group, Report

__all__ = ["format_usd", "render_html"]

_CENT: Final = Decimal("0.01")
_MAX_PLACES: Final = 8  # below $0.00000001 an amount is shown as "<$0.00000001"
_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# outcomes belong to no single call, so these groupings carry no outcomes (see _report._outcome_label)
_CALL_ONLY: Final = frozenset({"model", "vendor", "endpoint", "outcome"})
# the chart fills the days without calls between its ends; a window wider than this
# (``--since 2000-01-01``) is narrowed to the days that have calls
_MAX_FILLED_DAYS: Final = 3 * 366

# chart geometry (SVG user units; the SVG scales to the page width)
_W: Final = 960
_H: Final = 340
_TOP: Final = 40  # room for the legend
_BOTTOM: Final = 46  # date labels and the axis title
_RIGHT: Final = 28
_MAX_X_LABELS: Final = 12
_MAX_BAR: Final = 56.0
_SPENT_FILL: Final = "#2563eb"
_SAVED_FILL: Final = "#34d399"


# -- formatting -----------------------------------------------------------------------------------


def _e(value: object) -> str:
    """HTML-escaped text (quotes too, so it is safe in attribute values)."""
    return html.escape(str(value), quote=True)


def format_usd(amount: Decimal | None) -> str:
    """Dollars for people: ``$1,234.50``; amounts under a cent keep three significant digits
    (``$0.00105``, ``$0.0000025``) so tiny spends do not show as ``$0.00``; ``None`` is a dash."""
    if amount is None:
        return "—"
    sign = "-" if amount < 0 else ""
    size = abs(amount)
    if size == 0:
        return "$0.00"
    if size >= _CENT:
        return f"{sign}${size.quantize(_CENT, ROUND_HALF_UP):,.2f}"
    places = min(_MAX_PLACES, 2 - size.adjusted())
    rounded = size.quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP)
    if rounded == 0:
        return f"{sign}<$0.{'0' * (_MAX_PLACES - 1)}1"
    text = f"{rounded:.{places}f}".rstrip("0")
    if len(text.partition(".")[2]) < 2:
        text = f"{rounded:.2f}"
    return f"{sign}${text}"


def _count(n: int) -> str:
    return f"{n:,}"


def _percent(part: int, whole: int) -> str:
    """``part / whole`` as a whole percentage (exact arithmetic); ``<1%`` rather than a false 0%."""
    if whole <= 0:
        return "—"
    pct = (Decimal(part) * 100 / Decimal(whole)).quantize(Decimal(1), ROUND_HALF_UP)
    if pct == 0 and part > 0:
        return "<1%"
    if pct == 100 and part < whole:
        return ">99%"
    return f"{pct}%"


def _utc(when: datetime) -> datetime:
    return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)


def _when(when: datetime) -> str:
    when = _utc(when)
    return when.strftime("%Y-%m-%d") if when.time() == datetime.min.time() else when.strftime("%Y-%m-%d %H:%M")


def _period(report: Report) -> str:
    if report.since and report.until:
        return f"{_when(report.since)} to {_when(report.until)} UTC (end excluded)"
    if report.since:
        return f"since {_when(report.since)} UTC"
    if report.until:
        return f"before {_when(report.until)} UTC"
    return "All time"


def _day(d: date) -> str:
    return f"{_MONTHS[d.month - 1]} {d.day}, {d.year}"


def _short_day(d: date) -> str:
    return f"{_MONTHS[d.month - 1]} {d.day}"


# -- the chart ------------------------------------------------------------------------------------


def _chart_days(report: Report) -> list[tuple[date, Decimal, Decimal]]:
    """``report.daily`` with the days without calls filled in (spent and saved 0), from the
    start of the period (or the first call) to its end (or the last call)."""
    if not report.daily:
        return []
    known = {d: (spent, saved) for d, spent, saved in report.daily}
    first, last = report.daily[0][0], report.daily[-1][0]
    start, end = first, last
    if report.since is not None:
        start = min(first, _utc(report.since).date())
    if report.until is not None:
        end = max(last, (_utc(report.until) - timedelta(microseconds=1)).date())
    elif report.since is not None:
        end = max(last, _utc(report.generated_at).date())
    if (end - start).days >= _MAX_FILLED_DAYS:
        start, end = first, last
    zero = (Decimal(0), Decimal(0))
    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    return [(d, *known.get(d, zero)) for d in days]


def _ticks(peak: Decimal) -> list[Decimal]:
    """Round y-axis ticks from 0 to at least ``peak``: steps of 1, 2, 2.5 or 5 times a power of ten."""
    if peak <= 0:
        peak = Decimal(1)
    raw = peak / 4
    base = Decimal(1).scaleb(raw.adjusted())
    step = next(m * base for m in (Decimal(1), Decimal(2), Decimal("2.5"), Decimal(5), Decimal(10)) if m * base >= raw)
    count = max(int((peak / step).to_integral_value(rounding=ROUND_CEILING)), 1)
    return [step * i for i in range(count + 1)]


def _tick_label(value: Decimal, step: Decimal) -> str:
    if value == 0:
        return "$0"
    exponent = step.normalize().as_tuple().exponent
    places = max(2, -exponent) if isinstance(exponent, int) else 2
    return f"${value:,.{places}f}"


def _x_labels(days: Sequence[date]) -> list[tuple[int, str]]:
    """Which days get a date under the axis: every k-th day for up to three months, else month
    starts (every k-th month), so that at most ``_MAX_X_LABELS`` labels are drawn."""
    n = len(days)
    if n <= 92:
        every = -(-n // _MAX_X_LABELS)
        return [(i, _short_day(d)) for i, d in enumerate(days) if i % every == 0]
    starts = [i for i, d in enumerate(days) if d.day == 1]
    every = -(-len(starts) // _MAX_X_LABELS)
    picked = starts[::every]
    labels: list[tuple[int, str]] = []
    for j, i in enumerate(picked):
        d = days[i]
        name = _MONTHS[d.month - 1]
        labels.append((i, f"{name} {d.year}" if j == 0 or d.month <= every else name))
    return labels


def _num(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _chart(days: list[tuple[date, Decimal, Decimal]]) -> str:
    """The spend-per-day chart: stacked bars (spent, then saved by the cache on top), y ticks
    in dollars, thinned date labels, a legend, and a title and description for screen readers."""
    peak = max(spent + saved for _, spent, saved in days)
    ticks = _ticks(peak)
    top, step = ticks[-1], ticks[1] - ticks[0]
    labels = [_tick_label(t, step) for t in ticks]
    left = 34 + 7.0 * max(len(label) for label in labels)
    plot_w, plot_h = _W - left - _RIGHT, _H - _TOP - _BOTTOM
    base_y = _TOP + plot_h
    n = len(days)
    slot = plot_w / n
    bar = min(slot * (0.7 if n <= 31 else 0.85 if n <= 120 else 1.0), _MAX_BAR)

    def y_of(amount: Decimal) -> float:
        return float(amount / top) * plot_h  # pixels only: the amounts stay Decimal

    total_spent = sum((s for _, s, _ in days), Decimal(0))
    total_saved = sum((v for _, _, v in days), Decimal(0))
    busiest = max(days, key=lambda day: day[1])
    desc = (
        f"Spend per day from {_day(days[0][0])} to {_day(days[-1][0])} ({n} day{'s' if n != 1 else ''}, UTC): "
        f"{format_usd(total_spent)} spent, {format_usd(total_saved)} saved by the cache. "
        f"Highest day: {_day(busiest[0])}, {format_usd(busiest[1])} spent."
    )
    out = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" aria-labelledby="chart-title chart-desc" '
        f'font-family="system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif" font-size="12">',
        '<title id="chart-title">Spend per day (USD), with the amount saved by the cache</title>',
        f'<desc id="chart-desc">{_e(desc)}</desc>',
        '<g class="y-axis">',
    ]
    for tick, label in zip(ticks, labels, strict=True):
        y = base_y - y_of(tick)
        out.append(
            f'<line class="grid" x1="{_num(left)}" x2="{_num(_W - _RIGHT)}" y1="{_num(y)}" y2="{_num(y)}" '
            f'stroke="#e5e7eb" stroke-width="1"/>'
            f'<text class="y-label" x="{_num(left - 8)}" y="{_num(y + 4)}" text-anchor="end" fill="#4b5563">'
            f"{_e(label)}</text>"
        )
    out.append("</g>")
    out.append('<g class="bars">')
    for i, (day, spent, saved) in enumerate(days):
        x0 = left + i * slot
        x = x0 + (slot - bar) / 2
        spent_h, saved_h = y_of(spent), y_of(saved)
        if spent or saved:
            tip = f"{_day(day)}: {format_usd(spent)} spent, {format_usd(saved)} saved by the cache"
        else:
            tip = f"{_day(day)}: no calls"
        parts = [
            f'<g class="day" data-day="{day.isoformat()}"><title>{_e(tip)}</title>',
            f'<rect class="hit" x="{_num(x0)}" y="{_TOP}" width="{_num(slot)}" height="{_num(plot_h)}" '
            f'fill="transparent"/>',
        ]
        if spent_h > 0:
            parts.append(
                f'<rect class="spent" x="{_num(x)}" y="{_num(base_y - spent_h)}" width="{_num(bar)}" '
                f'height="{_num(spent_h)}" fill="{_SPENT_FILL}"/>'
            )
        if saved_h > 0:
            parts.append(
                f'<rect class="saved" x="{_num(x)}" y="{_num(base_y - spent_h - saved_h)}" width="{_num(bar)}" '
                f'height="{_num(saved_h)}" fill="{_SAVED_FILL}"/>'
            )
        parts.append("</g>")
        out.append("".join(parts))
    out.append("</g>")
    out.append(
        f'<line class="axis" x1="{_num(left)}" x2="{_num(_W - _RIGHT)}" y1="{_num(base_y)}" y2="{_num(base_y)}" '
        f'stroke="#6b7280" stroke-width="1"/>'
    )
    out.append('<g class="x-axis">')
    for i, text in _x_labels([d for d, _, _ in days]):
        cx = left + (i + 0.5) * slot
        out.append(
            f'<line x1="{_num(cx)}" x2="{_num(cx)}" y1="{_num(base_y)}" y2="{_num(base_y + 4)}" stroke="#6b7280"/>'
            f'<text class="x-label" x="{_num(cx)}" y="{_num(base_y + 18)}" text-anchor="middle" fill="#4b5563">'
            f"{_e(text)}</text>"
        )
    out.append("</g>")
    out.append(
        f'<text class="axis-title" x="{_num(left + plot_w / 2)}" y="{_H - 6}" text-anchor="middle" '
        f'fill="#374151">Day (UTC)</text>'
        f'<text class="axis-title" x="12" y="{_num(_TOP + plot_h / 2)}" text-anchor="middle" fill="#374151" '
        f'transform="rotate(-90 12 {_num(_TOP + plot_h / 2)})">USD per day</text>'
    )
    out.append(
        f'<g class="legend" transform="translate({_num(left)} 12)">'
        f'<rect width="12" height="12" rx="2" fill="{_SPENT_FILL}"/>'
        '<text x="18" y="10.5" fill="#111827">Spent</text>'
        f'<rect x="80" width="12" height="12" rx="2" fill="{_SAVED_FILL}"/>'
        '<text x="98" y="10.5" fill="#111827">Saved by the cache</text>'
        "</g>"
    )
    out.append("</svg>")
    return "\n".join(out)


def _chart_section(report: Report) -> str:
    days = _chart_days(report)
    parts = ['<section class="panel chart-panel" aria-labelledby="h-chart">', '<h2 id="h-chart">Spend over time</h2>']
    if not days:
        parts.append('<p class="empty" role="status">No calls in this period — nothing to chart yet.</p>')
        parts.append("</section>")
        return "\n".join(parts)
    spent = sum((s for _, s, _ in days), Decimal(0))
    with_calls = len(report.daily)
    average = (spent / len(days)).quantize(Decimal("0.000001"), ROUND_HALF_UP)
    busiest = max(days, key=lambda day: day[1])
    if len(days) == 1:
        lede = f"{_day(days[0][0])}: {format_usd(spent)} spent."
    else:
        lede = (
            f"{_day(days[0][0])} to {_day(days[-1][0])}: {_count(len(days))} days ({_count(with_calls)} with "
            f"calls). Average {format_usd(average)} a day; highest {format_usd(busiest[1])} on {_day(busiest[0])}."
        )
    parts.append(
        f'<p class="lede">{_e(lede)} A bar\'s full height is what the day would have cost without the cache.</p>'
    )
    parts.append(f'<figure class="chart-wrap">{_chart(days)}</figure>')
    rows = "".join(
        f"<tr><td>{d.isoformat()}</td><td class='num'>{_e(format_usd(s))}</td>"
        f"<td class='num'>{_e(format_usd(v))}</td></tr>"
        for d, s, v in report.daily
    )
    parts.append(
        f'<details class="daily"><summary>Daily figures ({_count(with_calls)} day{"s" if with_calls != 1 else ""} '
        "with calls)</summary>"
        '<div class="table-wrap"><table><thead><tr><th scope="col">Day (UTC)</th><th scope="col" class="num">Spent'
        f'</th><th scope="col" class="num">Saved by the cache</th></tr></thead><tbody>{rows}</tbody></table></div>'
        "</details>"
    )
    parts.append("</section>")
    return "\n".join(parts)


# -- cards and table ------------------------------------------------------------------------------


def _card(label: str, value: str, sub: str = "", cls: str = "") -> str:
    sub_html = f'<dd class="sub">{sub}</dd>' if sub else ""
    classes = f"card {cls}".strip()
    return f'<div class="{classes}"><dt>{label}</dt><dd class="value">{value}</dd>{sub_html}</div>'


def _cards(report: Report) -> str:
    t = report.total
    answered = t.sent + t.cache_hits
    outcomes = t.outcome_count
    primary = [
        _card("Total spent", _e(format_usd(t.spent_usd)), f"{_count(t.sent)} calls sent to the vendor", "spent"),
        _card(
            "Saved by the cache",
            _e(format_usd(t.saved_usd)),
            f"{_percent(t.cache_hits, answered)} of answers came from the cache "
            f"({_count(t.cache_hits)} of {_count(answered)})"
            if answered
            else "no answers yet",
            "saved",
        ),
        _card(
            "Cost per outcome",
            _e(format_usd(t.cost_per_outcome)),
            f"spend ÷ {_count(outcomes)} recorded outcome{'s' if outcomes != 1 else ''}"
            if outcomes
            else "no outcomes recorded yet",
            "key",
        ),
    ]
    secondary = [
        _card("Calls", _count(t.calls), f"{_count(t.errors)} error{'s' if t.errors != 1 else ''}"),
        _card("Retries", _count(t.retries), "extra attempts after a failure"),
        _card("Loops stopped", _count(t.loops_blocked), "runaway repeats refused"),
        _card("Budget blocks", _count(t.budget_blocks), "calls refused by a cap"),
    ]
    return (
        '<section class="summary" aria-label="Summary">'
        f'<dl class="cards primary">{"".join(primary)}</dl>'
        f'<dl class="cards secondary">{"".join(secondary)}</dl>'
        "</section>"
    )


def _tokens_cell(g: Group) -> str:
    return (
        f'<td class="num">{_count(g.input_tokens + g.output_tokens)}'
        f'<span class="sub">in {_count(g.input_tokens)} · out {_count(g.output_tokens)}</span></td>'
    )


def _metrics(g: Group) -> str:
    cost = g.cost_per_outcome
    if g.outcomes and not g.calls:  # outcomes recorded under a scope that made no calls
        cost_cell = (
            '<td class="num key none" title="outcomes were recorded here, but the calls that earned them '
            'are in other rows">no calls</td>'
        )
    elif cost is None:
        cost_cell = '<td class="num key none" title="no outcomes recorded">—</td>'
    else:
        cost_cell = f'<td class="num key"><strong>{_e(format_usd(cost))}</strong></td>'
    return (
        f'<td class="num">{_count(g.calls)}</td>'
        f'<td class="num">{_count(g.cache_hits)}</td>'
        f'<td class="num">{_e(format_usd(g.spent_usd))}</td>'
        f'<td class="num">{_e(format_usd(g.saved_usd))}</td>'
        f"{_tokens_cell(g)}"
        f'<td class="num">{_count(g.outcome_count) if g.outcomes else "—"}</td>'
        f"{cost_cell}"
    )


def _table_section(report: Report) -> str:
    by = report.by
    title = "By " + ", ".join(by) if by else "All calls"
    parts = [f'<section class="panel" aria-labelledby="h-groups"><h2 id="h-groups">{_e(title)}</h2>']
    if not report.groups:
        parts.append('<p class="empty" role="status">No calls in this period.</p></section>')
        return "\n".join(parts)
    key_heads = "".join(f'<th scope="col">{_e(name.capitalize())}</th>' for name in by) or '<th scope="col"></th>'
    heads = (
        f"{key_heads}"
        '<th scope="col" class="num">Calls</th><th scope="col" class="num">Cache hits</th>'
        '<th scope="col" class="num">Spent</th><th scope="col" class="num">Saved</th>'
        '<th scope="col" class="num">Tokens</th><th scope="col" class="num">Outcomes</th>'
        '<th scope="col" class="num key">Cost per outcome</th>'
    )
    body: list[str] = []
    if by:
        for g in report.groups:
            keys = "".join(
                f'<th scope="row">{_e(value)}</th>' if j == 0 else f"<td>{_e(value)}</td>"
                for j, value in enumerate(g.key)
            )
            body.append(f"<tr>{keys}{_metrics(g)}</tr>")
    label_span = max(len(by), 1)
    total_label = "Total" if by else "All calls"
    colspan = f' colspan="{label_span}"' if label_span > 1 else ""
    foot = f'<tr class="total"><th scope="row"{colspan}>{total_label}</th>{_metrics(report.total)}</tr>'
    parts.append(
        f'<div class="table-wrap"><table class="groups"><thead><tr>{heads}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody><tfoot>{foot}</tfoot></table></div>"
    )
    notes = [
        "<strong>Cost per outcome</strong> = spend ÷ the outcomes your app recorded with "
        "<code>tokenguard.record_outcome()</code> (an answer accepted, a ticket resolved). "
        "It is the column to read: what a useful result costs, not how many tokens someone used. "
        f"Rows are in order of {_e(', '.join(by)) if by else 'key'}, never ranked by volume."
    ]
    if any(name in _CALL_ONLY for name in by):
        notes.append(
            "An outcome belongs to no single model, vendor, endpoint or call result, so with this grouping "
            "the cost per outcome is on the total row only."
        )
    if report.total.outcomes:
        named = ", ".join(f"{_e(name)} {_count(n)}" for name, n in sorted(report.total.outcomes.items()))
        notes.append(f"Outcomes recorded: {named}.")
    parts.append("".join(f'<p class="note">{note}</p>' for note in notes))
    parts.append("</section>")
    return "\n".join(parts)


def _caveats(report: Report) -> str:
    t = report.total
    items: list[str] = []
    if t.unpriced:
        items.append(
            f"{_count(t.unpriced)} call{'s' if t.unpriced != 1 else ''} had no known price and count as $0: "
            "the spend shown is a lower bound."
        )
    if t.estimated:
        items.append(
            f"{_count(t.estimated)} call{'s' if t.estimated != 1 else ''} were priced from estimated token counts "
            "(streams without usage, timeouts)."
        )
    if t.other_blocks:
        items.append(f"{_count(t.other_blocks)} call(s) were refused for other reasons (not loops or budgets).")
    if not items:
        return ""
    return '<ul class="caveats" aria-label="Notes on the figures">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _version() -> str:
    try:
        return metadata.version("tokenguard")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return ""


_CSS: Final = """
:root { color-scheme: light; --ink: #111827; --muted: #4b5563; --line: #e5e7eb; --bg: #f3f4f6;
  --panel: #ffffff; --accent: #2563eb; --saved: #047857; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; background: var(--bg); color: var(--ink); line-height: 1.45;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.page { max-width: 1120px; margin: 0 auto; padding: 28px 20px 40px; }
header h1 { margin: 0; font-size: 1.6rem; letter-spacing: -0.01em; }
header .brand { margin: 0 0 4px; color: var(--accent); font-weight: 600; font-size: .85rem;
  text-transform: uppercase; letter-spacing: .08em; }
dl { margin: 0; }
dd { margin: 0; }
.meta { display: flex; flex-wrap: wrap; gap: 6px 24px; margin: 12px 0 20px; color: var(--muted); font-size: .9rem; }
.meta div { display: flex; gap: 6px; }
.meta dt { font-weight: 600; color: var(--ink); }
.meta dt::after { content: ":"; }
code { font: .9em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
.cards { display: grid; gap: 12px; margin-bottom: 12px; }
.cards.primary { grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); }
.cards.secondary { grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); margin-bottom: 20px; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
.card dt { color: var(--muted); font-size: .8rem; font-weight: 600; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 1.45rem; font-weight: 700; margin-top: 4px; font-variant-numeric: tabular-nums;
  overflow-wrap: anywhere; }
.card .sub { color: var(--muted); font-size: .82rem; margin-top: 2px; }
.card.spent { border-top: 4px solid var(--accent); }
.card.saved { border-top: 4px solid #34d399; }
.card.saved .value { color: var(--saved); }
.card.key { border-top: 4px solid var(--ink); }
.primary .card .value { font-size: 2rem; }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; padding: 18px 20px;
  margin-bottom: 20px; }
.panel h2 { margin: 0 0 6px; font-size: 1.15rem; }
.lede { margin: 0 0 8px; color: var(--muted); font-size: .9rem; }
.chart-wrap { margin: 0; overflow-x: auto; }
.chart { display: block; width: 100%; min-width: 560px; height: auto; }
.chart .day:hover .hit { fill: rgba(17, 24, 39, .06); }
.chart .day:hover .spent { fill: #1d4ed8; }
.chart .day:hover .saved { fill: #10b981; }
.empty { margin: 8px 0 0; padding: 28px; text-align: center; color: var(--muted); background: var(--bg);
  border-radius: 8px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; font-variant-numeric: tabular-nums; }
th, td { padding: 7px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { font-size: .78rem; text-transform: uppercase; letter-spacing: .04em; color: var(--muted);
  border-bottom: 2px solid var(--line); white-space: nowrap; }
tbody th { font-weight: 600; overflow-wrap: break-word; }
.num { text-align: right; white-space: nowrap; }
td .sub { display: block; color: var(--muted); font-size: .75rem; }
th.key { color: var(--ink); }
td.key { font-weight: 700; background: #eff6ff; }
td.key.none { color: var(--muted); font-weight: 400; }
tfoot tr.total th, tfoot tr.total td { font-weight: 700; border-top: 2px solid var(--ink); border-bottom: 0; }
.note { color: var(--muted); font-size: .85rem; margin: 10px 0 0; }
.caveats { margin: 0 0 20px; padding: 10px 14px 10px 32px; background: #fffbeb; border: 1px solid #fde68a;
  border-radius: 8px; color: #78350f; font-size: .9rem; }
details.daily { margin-top: 10px; font-size: .9rem; }
details.daily summary { cursor: pointer; color: var(--accent); }
details.daily table { max-width: 480px; }
footer { color: var(--muted); font-size: .8rem; text-align: center; }
@media (max-width: 600px) {
  .page { padding: 16px 10px 28px; }
  .card .value { font-size: 1.3rem; }
  .primary .card .value { font-size: 1.6rem; }
  .panel { padding: 14px 12px; }
}
@page { margin: 14mm; }
@media print {
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  body { background: #fff; font-size: 10.5pt; }
  .page { max-width: none; padding: 0; }
  .panel, .card { border-color: #d1d5db; }
  .card, .chart-panel { break-inside: avoid; page-break-inside: avoid; }
  .cards.primary { grid-template-columns: repeat(3, 1fr); }
  .cards.secondary { grid-template-columns: repeat(4, 1fr); }
  .table-wrap, .chart-wrap { overflow: visible; }
  .chart { min-width: 0; }
  thead { display: table-header-group; }
  tr { break-inside: avoid; page-break-inside: avoid; }
  details.daily { display: none; }
  .chart .hit { fill: transparent !important; }
}
"""


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page: summary cards (spend, cache savings, calls,
    retries, loops stopped, budget blocks, cost per outcome), a spend-per-day SVG chart and a
    table of the groups in the report's order. No external resources, no JavaScript; every
    ledger value is escaped and the store URL is shown without credentials."""
    generated = _utc(report.generated_at)
    version = _version()
    by = ", ".join(report.by) if report.by else "(nothing: all calls together)"
    meta = [
        ("Period", _e(_period(report))),
        ("Grouped by", _e(by)),
        ("Store", f"<code>{_e(redact_url(report.store))}</code>"),
        (
            "Generated",
            f'<time datetime="{_e(generated.isoformat(timespec="seconds"))}">'
            f"{_e(generated.strftime('%Y-%m-%d %H:%M'))} UTC</time>",
        ),
    ]
    meta_html = "".join(f"<div><dt>{name}</dt><dd>{value}</dd></div>" for name, value in meta)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="generator" content="tokenguard">',
            f"<title>LLM spend report — {_e(_period(report))}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            '<main class="page">',
            "<header>",
            '<p class="brand">tokenguard</p>',
            "<h1>LLM spend report</h1>",
            f'<dl class="meta">{meta_html}</dl>',
            "</header>",
            _cards(report),
            _caveats(report),
            _chart_section(report),
            _table_section(report),
            f"<footer>Generated by tokenguard{' ' + _e(version) if version else ''} on "
            f"{_e(generated.strftime('%Y-%m-%d %H:%M'))} UTC. Days are UTC days. Amounts in US dollars.</footer>",
            "</main>",
            "</body>",
            "</html>",
            "",
        ]
    )
