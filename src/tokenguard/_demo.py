"""``tokenguard demo``: a short story told through the real drop-in clients, with no API key and no network.

A fake OpenAI- and Anthropic-compatible API (``tokenguard.testing.FakeLLM``) is served over
real HTTP on loopback (``tokenguard.testing.FakeServer``), and ``tokenguard.OpenAI`` / ``tokenguard.Anthropic``
talk to it through the SDKs' own HTTP stack. Five chapters, one line per event:

1. repeated questions answered from the response cache at $0;
2. a 429 storm retried with the server's ``Retry-After`` and backoff, and a 429
   ``insufficient_quota`` that is not retried;
3. a runaway job stopped by the loop detector before it is sent;
4. a user's budget crossing its 50/75/90% alerts, then refusing a call;
5. the report (cost per outcome) and what tokenguard saved.

Everything is written to a throwaway SQLite ledger; the user's own ledger is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Final

import anthropic
import openai
from rich.console import Console
from rich.padding import Padding
from rich.panel import Panel
from rich.rule import Rule
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from ._anthropic_clients import Anthropic
from ._budget import Alert, Budget
from ._cache import Cache, cache_control
from ._errors import BudgetExceeded, LoopDetected
from ._guard import Guard
from ._ledger import LedgerRow
from ._loops import LoopDetector
from ._openai_clients import OpenAI
from ._report import build_report
from ._retry import Retry
from ._scope import scope
from .testing import ErrorReply, FakeLLM, FakeServer, Reply

__all__ = ["DemoResult", "play_demo", "run_demo"]

# -- the story -----------------------------------------------------------------------------------

_SUPPORT_SYSTEM: Final = (
    "You are Acme's support assistant. Answer from the help-center articles below, in two short "
    "paragraphs. Articles: [Account] Passwords, two-factor sign-in, email changes. [Billing] Plans, "
    "invoices, refunds. [Data] Exports, deletion, retention."
)
_FAQ: Final = "How do I reset my password?"
_FAQ_ANSWER: Final = (
    "Open Settings → Security and choose “Reset password”. We email you a link that works for 30 minutes."
)
_JOB_PROMPT: Final = (
    "Attempt {n}: last night's export produced invalid JSON. Repair it and return only the JSON:\n"
    '{{"orders": [{{"id": 4312, "total": 18.50,}}, {{"id": 4313 "total": 7.25}}'
)
_JOB_MAX_ATTEMPTS: Final = 50
# Dana's reports: (title, input tokens, output tokens). Long outputs make them dear; these
# sizes walk her $0.25/day budget past 50%, 75% and 90%, and the sixth no longer fits.
_REPORTS: Final = (
    ("Draft the Q3 board update", 500, 4_800),
    ("Write the investor FAQ", 700, 4_900),
    ("Summarise the churn analysis", 600, 4_600),
    ("Draft the hiring plan", 800, 4_500),
    ("Write the launch press release", 400, 3_600),
    ("Draft the 2027 roadmap", 600, 4_700),
)
_DANA_LIMIT: Final = Decimal("0.25")
_REPORT_MAX_TOKENS: Final = 5_000
_VERDICT_WIDTH: Final = 17

_GUARD_CODE: Final = """\
guard = tokenguard.Guard(
    store="sqlite:///demo.db",                     # a throwaway ledger
    cache=tokenguard.Cache("memory"),              # repeats answered at $0
    retry=tokenguard.Retry(initial_delay_s=0.2),   # honours Retry-After
    loops=tokenguard.LoopDetector(max_repeats=3),  # the 4th repeat: refused
    budgets=[tokenguard.Budget(limit_usd=0.25, period="day", per="user")],
    on_alert=notify,                               # at 50%, 75% and 90%
)
client = tokenguard.OpenAI(base_url=f"{url}/v1", api_key=..., guard=guard)
claude = tokenguard.Anthropic(base_url=url, api_key=..., guard=guard)"""


@dataclass(slots=True)
class DemoResult:
    """What happened in a demo run (for tests, and for the closing summary)."""

    store: str = ""
    server_requests: int = 0  # money-spending requests the fake server answered
    cache_hits: int = 0
    cache_saved_usd: Decimal = field(default_factory=Decimal)
    storm_attempts: int = 0  # requests the server saw for the call that met the 429 storm
    quota_attempts: int = 0  # requests the server saw for the insufficient_quota call
    loop_sent: int = 0
    loop_refused: int = 0
    loop_prevented_usd: Decimal = field(default_factory=Decimal)
    alerts: list[float] = field(default_factory=list)  # thresholds crossed, in order
    budget_blocked: bool = False
    budget_prevented_usd: Decimal = field(default_factory=Decimal)
    report_groups: int = 0
    spent_usd: Decimal = field(default_factory=Decimal)
    seconds: float = 0.0

    @property
    def saved_usd(self) -> Decimal:
        """Cache savings plus what the loop detector and the budget kept from being sent."""
        return self.cache_saved_usd + self.loop_prevented_usd + self.budget_prevented_usd


def _usd(amount: Decimal | None) -> str:
    """Dollars with the decimals the amount needs, from 2 to 6: $0.25, $0.0135, $0.00675."""
    if amount is None:
        return "unpriced"
    if amount == 0:
        return "$0"
    exponent = amount.normalize().as_tuple().exponent
    places = min(6, max(2, -exponent if isinstance(exponent, int) else 2))
    return f"${amount:,.{places}f}"


def _about(amount: Decimal) -> str:
    """An estimate, to the hundredth of a cent: ≈ $0.6345."""
    return f"≈ {_usd(amount.quantize(Decimal('0.0001')))}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:,.0f} ms"


def _bar(fraction: float, width: int = 10) -> Text:
    filled = max(0, min(width, round(fraction * width)))
    style = "green" if fraction < 0.5 else "yellow" if fraction < 0.75 else "dark_orange" if fraction < 0.9 else "red"
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "grey42"), f" {fraction:.0%}")


class _LogLines(logging.Handler):
    """Shows tokenguard's log records on the demo's console (retries as event lines)."""

    def __init__(self, story: _Story) -> None:
        super().__init__(logging.INFO)
        self.story = story

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a display problem must never break a call
            self.story.on_log(record)


class _Story:
    """The demo's state (console, guard, server, clients, what happened) and its chapters."""

    def __init__(self, console: Console, server: FakeServer, store_url: str, pace_s: float, *, kept: bool) -> None:
        self.console = console
        self.kept = kept
        self.server = server
        self.fake = server.fake
        self.pace_s = pace_s
        self.result = DemoResult(store=store_url)
        self.pending_alerts: list[Alert] = []
        self.user = ""
        self.model = ""
        self.show_model = console.width >= 100
        self._seen_rows = 0
        self.guard = Guard(
            store=store_url,
            cache=Cache("memory"),
            retry=Retry(attempts=4, initial_delay_s=0.2, max_delay_s=2.0, deadline_s=30.0),
            loops=LoopDetector(max_repeats=3, window_s=600),
            budgets=[Budget(limit_usd=_DANA_LIMIT, period="day", per="user")],
            on_alert=self.pending_alerts.append,  # shown after the call's own line
            settle_delay_s=0,  # settle in the caller's thread: each line shows its call's ledger row
        )
        # the real drop-in clients; their HTTP clients ignore proxy settings: the server is on loopback
        self.openai = OpenAI(
            api_key="sk-demo",
            base_url=server.openai_base_url,
            guard=self.guard,
            http_client=openai.DefaultHttpxClient(trust_env=False),
        )
        self.claude = Anthropic(
            api_key="sk-ant-demo",
            base_url=server.anthropic_base_url,
            guard=self.guard,
            http_client=anthropic.DefaultHttpxClient(trust_env=False),
        )

    def close(self) -> None:
        """Close both clients (and their connections)."""
        self.openai.close()
        self.claude.close()

    # -- printing --------------------------------------------------------------------------------

    def pause(self, factor: float = 1.0) -> None:
        if self.pace_s > 0:
            time.sleep(self.pace_s * factor)

    def chapter(self, number: int, title: str, intro: str, how: str) -> None:
        self.pause(2)
        self.console.print()
        self.console.print(Rule(f"[bold]{number} · {title}[/]", align="left", style="blue"))
        self.console.print(Text(intro, "italic"))
        self.console.print(Text.assemble(("how: ", "dim"), (how, "cyan")))
        self.pause()

    def event(self, mark: str, style: str, verdict: str, *detail: str | Text) -> None:
        """One line: who, the model, what happened, and the details."""
        grid = Table.grid()  # fixed columns: a long detail wraps inside its own column
        grid.add_column(width=14, no_wrap=True)
        cells: list[str | Text] = [Text.assemble("  ", (self.user, "bold cyan"))]
        if self.show_model:
            grid.add_column(width=18, no_wrap=True)
            cells.append(Text(self.model, "dim"))
        grid.add_column(width=_VERDICT_WIDTH, no_wrap=True)
        grid.add_column(ratio=1)
        cells.append(Text(f"{mark} {verdict}", style))
        line = Text()
        for i, part in enumerate(detail):
            if i:
                line.append(" · ", "dim")
            line.append(part)
        cells.append(line)
        grid.add_row(*cells)
        self.console.print(grid)
        self.pause()

    def note(self, text: str) -> None:
        self.console.print(Padding(Text.assemble(("→ ", "bold green"), text), (0, 0, 0, 2)))
        self.pause()

    def show_alerts(self) -> None:
        while self.pending_alerts:
            alert = self.pending_alerts.pop(0)
            if alert.kind == "blocked":
                text = "her budget refused a call"
            else:
                self.result.alerts.append(alert.threshold)
                text = f"{alert.threshold:.0%} of her {_usd(alert.limit_usd)}/{alert.budget.period} used"
            self.event("⚑", "bold yellow", "on_alert", Text(text, "yellow"), f"{_usd(alert.spent_usd)} spent")

    def new_rows(self) -> list[LedgerRow]:
        rows = list(self.guard.store.rows())
        fresh = rows[self._seen_rows :]
        self._seen_rows = len(rows)
        return fresh

    def last_row(self) -> LedgerRow:
        rows = self.new_rows()
        if not rows:
            raise AssertionError("every call is a ledger row")
        return rows[-1]

    def sent_line(self, row: LedgerRow, *extra: str | Text) -> None:
        self.event(
            "✓",
            "green",
            "sent",
            f"{row.usage.input_tokens:,} in · {row.usage.output_tokens:,} out",
            Text(_usd(row.cost_usd), "bold"),
            *extra,
        )

    def money_requests(self) -> int:
        return sum(1 for e in self.server.exchanges if e.method == "POST" and e.status != 0)

    def on_log(self, record: logging.LogRecord) -> None:
        """A tokenguard log record: a retry is an event line; loops are shown by the chapter itself."""
        args = record.args
        if "retry %d of %d" in str(record.msg) and isinstance(args, tuple) and len(args) == 5:
            _what, reason, number, of, wait = args
            exchanges = self.server.exchanges
            asked = bool(exchanges) and any(h in exchanges[-1].headers for h in ("retry-after-ms", "retry-after"))
            why = "the server's Retry-After" if asked else "backoff + jitter"
            label = {"429": "rate limited", "500": "server error", "503": "overloaded", "529": "overloaded"}
            self.event(
                "✗",
                "red",
                str(reason),
                label.get(str(reason), "failed"),
                f"waits {wait if isinstance(wait, int | float) else 0:.2f} s ({why})",
                Text(f"retry {number} of {of}", "dim"),
            )
            return
        message = record.getMessage()
        if record.levelno >= logging.WARNING and not message.startswith("tokenguard: loop detected"):
            self.console.print(Text(f"  log: {message}", "dim"))

    # -- the chapters ----------------------------------------------------------------------------

    def repeated_questions(self) -> None:
        self.chapter(
            1,
            "Repeated questions → the response cache",
            "Six customers ask the support bot the same question. The OpenAI bot asks at temperature=0, "
            "a request for the same answer every time, so tokenguard may give the stored one.",
            'Guard(cache=tokenguard.Cache("memory")); for Anthropic: with tokenguard.cache_control(always=True)',
        )
        self.fake.default = Reply(text=_FAQ_ANSWER, input_tokens=1_500, output_tokens=300)
        paid: list[Decimal] = []
        hit_latency = 0.0
        self.model = "gpt-4o"
        for user in ("alice", "bob", "carol", "dave"):
            self.user = user
            with scope(user=user):
                self.openai.chat.completions.create(
                    model="gpt-4o",
                    messages=[{"role": "system", "content": _SUPPORT_SYSTEM}, {"role": "user", "content": _FAQ}],
                    temperature=0,
                    max_tokens=400,
                )
            hit_latency = max(hit_latency, self.call_line(self.last_row(), paid))
        self.model = "claude-sonnet-4-6"
        for user in ("erin", "frank"):
            self.user = user
            with scope(user=user), cache_control(always=True):
                self.claude.messages.create(
                    model="claude-sonnet-4-6",
                    max_tokens=400,
                    system=_SUPPORT_SYSTEM,
                    messages=[{"role": "user", "content": _FAQ}],
                )
            hit_latency = max(hit_latency, self.call_line(self.last_row(), paid))
        saved = self.result.cache_saved_usd
        share = saved / (saved + sum(paid, Decimal(0)))
        self.note(
            f"6 questions, {len(paid)} paid for. The cache answered {self.result.cache_hits} with no request, "
            f"in {_ms(hit_latency)} or less, and saved {_usd(saved)}: {share:.0%} of this bill."
        )

    def call_line(self, row: LedgerRow, paid: list[Decimal]) -> float:
        """Print a sent call or a cache hit (adding a sent call's cost to ``paid``); a hit's latency, else 0."""
        if row.outcome != "cache_hit":
            paid.append(row.cost_usd or Decimal(0))
            self.sent_line(row, _ms(row.latency_s))
            return 0.0
        self.result.cache_hits += 1
        self.result.cache_saved_usd += row.saved_usd or 0
        self.event(
            "↺",
            "bold magenta",
            "cache hit",
            Text("$0", "bold"),
            Text(f"saved {_usd(row.saved_usd)}", "green"),
            _ms(row.latency_s),
            Text("no request sent", "dim"),
        )
        return row.latency_s

    def retry_storm(self) -> None:
        self.chapter(
            2,
            "A 429 storm → bounded retry",
            "The API is struggling: it answers 429, 503 and 429 before it answers. tokenguard retries for the "
            "caller, waiting as long as the server asks. The SDK's own retries are off, so attempts never multiply.",
            "Guard(retry=tokenguard.Retry(attempts=4, initial_delay_s=0.2))   # retry=True, the default: Retry()",
        )
        self.user, self.model = "alice", "gpt-4o"
        self.fake.default = Reply(text="Your March invoice is attached.", input_tokens=1_500, output_tokens=300)
        self.fake.queue(
            ErrorReply(
                429,
                "Rate limit reached for gpt-4o on requests per min (RPM): Limit 500, Used 500. "
                "Please try again in 300ms.",
                {"retry-after-ms": "300"},
                "requests",
            ),
            ErrorReply(503, "The server is overloaded or not ready yet.", {}, "server_error"),
            ErrorReply(429, "Rate limit reached for gpt-4o. Please try again in 250ms.", {"retry-after-ms": "250"}),
        )
        before = self.money_requests()
        with scope(user="alice"):
            self.openai.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "Please send me my March invoice."}],
                max_tokens=400,
            )
        self.result.storm_attempts = self.money_requests() - before
        row = self.last_row()
        self.sent_line(row, f"{row.latency_s:.1f} s in all", Text(f"attempt {row.attempts} of 4", "dim"))
        self.note(
            f"The caller got one ordinary answer: no exception, no retry loop of its own. "
            f"Its ledger row says attempts={row.attempts}."
        )

        self.console.print()
        self.console.print(Text("Then the account runs out of credit: 429 insufficient_quota.", "italic"))
        self.pause()
        self.fake.queue(
            ErrorReply(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                {},
                "insufficient_quota",
            )
        )
        before = self.money_requests()
        try:
            with scope(user="alice"):
                self.openai.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "And my April invoice?"}], max_tokens=400
                )
        except openai.RateLimitError as err:
            self.result.quota_attempts = self.money_requests() - before
            self.new_rows()
            self.event(
                "✗",
                "red",
                "429",
                "insufficient_quota",
                "sent once" if self.result.quota_attempts == 1 else f"sent {self.result.quota_attempts} times",
                Text(f"openai.{type(err).__name__} raised at once", "dim"),
            )
        self.note(
            "Never retry what cannot succeed: waiting does not refill an account. (The bare SDK retries every 429.)"
        )

    def runaway_loop(self) -> None:
        self.chapter(
            3,
            "A runaway loop → the loop detector",
            "A nightly job asks Claude to repair a broken JSON file, and asks again until the answer parses. "
            f"It never parses, and the job swallows every error, for up to {_JOB_MAX_ATTEMPTS} attempts.",
            "Guard(loops=tokenguard.LoopDetector(max_repeats=3, window_s=600))   # 'Attempt N' still counts",
        )
        self.user, self.model = "nightly-job", "claude-sonnet-4-6"
        self.fake.default = Reply(
            text="Here is the repaired JSON: {orders: [...]}", input_tokens=2_000, output_tokens=500
        )
        sent: list[Decimal] = []
        refused = 0
        with scope(user="nightly-job"):
            for attempt in range(1, _JOB_MAX_ATTEMPTS + 1):
                try:
                    self.claude.messages.create(
                        model="claude-sonnet-4-6",
                        max_tokens=1_000,
                        messages=[{"role": "user", "content": _JOB_PROMPT.format(n=attempt)}],
                    )
                except LoopDetected as err:  # the job's `except Exception: continue`
                    refused += 1
                    if refused == 1:
                        how = "exact repeat" if err.level == "exact" else "only the counter changed"
                        self.new_rows()
                        self.event(
                            "⊘",
                            "bold red",
                            "LoopDetected",
                            f"attempt {attempt} not sent",
                            Text(f"seen {err.repeats} times in {err.window_s / 60:g} min, {how}", "dim"),
                        )
                    continue
                row = self.last_row()
                sent.append(row.cost_usd or Decimal(0))
                self.sent_line(row, Text(f"attempt {attempt}", "dim"))
        self.new_rows()
        self.result.loop_sent = len(sent)
        self.result.loop_refused = refused
        average = sum(sent, Decimal(0)) / len(sent) if sent else Decimal(0)
        self.result.loop_prevented_usd = average * refused
        if refused > 1:
            self.event(
                "⊘",
                "bold red",
                "refused",
                f"attempts {_JOB_MAX_ATTEMPTS - refused + 2} to {_JOB_MAX_ATTEMPTS} not sent",
                Text("$0", "bold"),
                Text("each refused in the loop's cool-down", "dim"),
            )
        self.note(
            f"Stopped after {len(sent)} paid attempts: {refused} never sent, "
            f"{_about(self.result.loop_prevented_usd)} not burned. A job should catch tokenguard.LoopDetected "
            "and page someone."
        )

    def user_budget(self) -> None:
        self.chapter(
            4,
            "A user's budget → alerts, then a hard cap",
            f"Dana drafts long reports with gpt-4o; each user may spend {_usd(_DANA_LIMIT)} a day. tokenguard "
            "reserves each call's worst case (max_tokens included) before sending it, so the cap holds even "
            "under concurrency.",
            f'Guard(budgets=[tokenguard.Budget(limit_usd={_DANA_LIMIT}, period="day", per="user")], on_alert=notify)',
        )
        self.user, self.model = "dana", "gpt-4o"
        with scope(user="dana"):
            for title, input_tokens, output_tokens in _REPORTS:
                self.fake.default = Reply(text=f"{title}: …", input_tokens=input_tokens, output_tokens=output_tokens)
                try:
                    self.openai.chat.completions.create(
                        model="gpt-4o",
                        messages=[{"role": "user", "content": f"{title}. Use the attached notes."}],
                        max_tokens=_REPORT_MAX_TOKENS,
                    )
                except BudgetExceeded as err:
                    self.new_rows()
                    self.result.budget_blocked = True
                    self.result.budget_prevented_usd = err.needed_usd
                    self.event("⊘", "bold red", "BudgetExceeded", f"{title}: not sent", Text("$0", "bold"))
                    self.show_alerts()
                    self.console.print(
                        Padding(
                            Panel(Text(str(err)), title="tokenguard.BudgetExceeded", border_style="red", expand=False),
                            (0, 0, 0, 2),
                        )
                    )
                    self.pause()
                    break
                row = self.last_row()
                spent = self.guard.budget_status(user="dana")[0].spent_usd
                self.sent_line(row, _bar(float(spent / _DANA_LIMIT)))
                self.show_alerts()
        self.note(
            "Dana was warned at 50%, 75% and 90%, and her sixth report was refused before it was sent: "
            f"she stays under {_usd(_DANA_LIMIT)}, whatever her scripts do."
        )

    def report(self) -> None:
        from .cli import print_report  # here, not at the top: the CLI imports this module

        self.chapter(
            5,
            "The report → cost per outcome",
            "The apps tell tokenguard what their calls achieved; the report divides spend by outcomes, per user.",
            'tokenguard.record_outcome("answer_accepted", guard=guard, user="bob")   # then: tokenguard report',
        )
        for user, count in (("alice", 2), ("bob", 1), ("carol", 1), ("dave", 1), ("erin", 1), ("frank", 1)):
            self.guard.record_outcome("answer_accepted", count, user=user)
        self.guard.record_outcome("report_delivered", 5, user="dana")
        report = build_report(self.guard.store, by=["user"])
        self.result.report_groups = len(report.groups)
        self.result.spent_usd = report.total.spent_usd
        if not self.kept:
            report.store = "the demo's throwaway ledger, deleted at the end"
        self.console.print()
        print_report(report, self.console)
        self.pause(2)

    def summary(self) -> None:
        r = self.result
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        table.add_column(justify="right", style="bold green")
        table.add_row(
            "cache", f"{r.cache_hits} repeated questions answered at $0 (from the ledger)", _usd(r.cache_saved_usd)
        )
        table.add_row(
            "loop detector",
            f"{r.loop_refused} runaway attempts never sent (at the job's cost per attempt)",
            _about(r.loop_prevented_usd),
        )
        table.add_row(
            "budget", "Dana's sixth report refused (at most its worst case)", f"≤ {_usd(r.budget_prevented_usd)}"
        )
        table.add_row("retry", f"{r.storm_attempts - 1} retries the caller never saw; 1 hopeless 429 sent once", "")
        table.add_section()
        table.add_row(
            "in all",
            f"spent {_usd(r.spent_usd)} on {r.server_requests} requests; kept off the bill",
            _about(r.saved_usd),
        )
        self.console.print()
        self.console.print(
            Panel(table, title="[bold]What tokenguard saved in this demo[/]", border_style="green", expand=False)
        )


def play_demo(console: Console, *, store_dir: Path | None = None, pace_s: float = 0.0) -> DemoResult:
    """Tell the demo's story on ``console`` and return what happened (``run_demo`` is the command).

    ``store_dir``: keep the demo's SQLite ledger there (a new file each run) instead of in a
    temporary directory removed at the end. ``pace_s``: a pause after each event, for people.
    """
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if store_dir is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tokenguard-demo-")))
        else:
            folder = Path(store_dir).expanduser().resolve()
            folder.mkdir(parents=True, exist_ok=True)
        ledger = folder / f"tokenguard-demo-{datetime.now():%Y%m%d-%H%M%S-%f}.db"
        server = stack.enter_context(FakeServer(FakeLLM()))
        stack.enter_context(_quiet_deprecations())
        console.print(
            Panel(
                Text.assemble(
                    ("tokenguard demo", "bold"),
                    f"  ·  a fake OpenAI and Anthropic API is serving on {server.url}\n",
                    "The real openai and anthropic SDK clients call it through tokenguard's drop-in classes. "
                    "No API key and no network; the prices are real (genai-prices); your own ledger is not touched.",
                ),
                border_style="blue",
            )
        )
        console.print(Syntax(_GUARD_CODE, "python", theme="ansi_dark", background_color="default", word_wrap=True))
        story = _Story(console, server, f"sqlite:///{ledger.as_posix()}", pace_s, kept=store_dir is not None)
        stack.callback(story.guard.close)
        stack.callback(story.close)
        stack.enter_context(_showing_logs(story))
        story.repeated_questions()
        story.retry_storm()
        story.runaway_loop()
        story.user_budget()
        story.result.server_requests = story.money_requests()
        story.report()
        story.summary()
        result = story.result
    result.seconds = time.monotonic() - started
    console.print()
    if store_dir is not None:
        console.print(
            Text.assemble("The demo's ledger is kept: ", (f"tokenguard report --store {result.store}", "bold"))
        )
    console.print(
        Text.assemble(
            ("Your turn: ", "bold"),
            "change one import line, ",
            ("from tokenguard import OpenAI", "cyan"),
            " (or Anthropic), and every call is priced, recorded and guarded.",
        )
    )
    return result


def run_demo(console: Console, *, store_dir: Path | None = None, pace_s: float = 0.0) -> int:
    """The ``tokenguard demo`` command: tell the story on ``console``; 0 on success.

    Whatever goes wrong (say, no loopback port can be bound) is one line and status 1,
    never a traceback; Ctrl-C is status 130.
    """
    try:
        play_demo(console, store_dir=store_dir, pace_s=pace_s)
    except KeyboardInterrupt:
        console.print("[yellow]demo interrupted[/]")
        return 130
    except Exception as err:
        console.print(Text.assemble(("the demo failed: ", "bold red"), f"{type(err).__name__}: {err}"))
        return 1
    return 0


@contextlib.contextmanager
def _showing_logs(story: _Story) -> Iterator[None]:
    """Send the ``tokenguard`` logger's records to the story (and nowhere else) while it runs."""
    logger = logging.getLogger("tokenguard")
    handler = _LogLines(story)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """The SDKs warn about models nearing retirement: the demo's fixed models must not interrupt the story."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The model .* is deprecated", category=DeprecationWarning)
        yield
