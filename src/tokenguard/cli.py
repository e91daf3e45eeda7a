"""The ``tokenguard`` command: a demo anyone can run, reports people read, budgets, the cache,
prices, estimates and the effective configuration.

Every command reads the store named by ``--store`` or ``TOKENGUARD_STORE`` (default: the
configured ``store``, else the ledger in the user data directory). A user's mistake (a bad date, an unknown model, a
store that cannot be opened) is one clear line on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, TypeVar

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ._errors import TokenguardError, _plain
from ._redact import redact_url
from ._report import Group, Report, build_report, parse_when

__all__ = ["main", "print_report"]

F = TypeVar("F", bound=Callable[..., Any])


def _usd(amount: Decimal | None, places: int = 4) -> str:
    if amount is None:
        return "-"
    return f"${amount:,.{places}f}"


_WIDE: Final = 120  # a console at least this wide gets the environment column of `config`

# the report's numeric columns, in the order they are given up on a narrow console (last first)
_COLUMNS: Final[tuple[tuple[str, Callable[[Group], str]], ...]] = (
    ("spent", lambda g: _usd(g.spent_usd)),
    ("$/outcome", lambda g: _usd(g.cost_per_outcome)),
    ("calls", lambda g: f"{g.calls:,}"),
    ("saved", lambda g: _usd(g.saved_usd)),
    ("hits", lambda g: f"{g.cache_hits:,}"),
    ("outcomes", lambda g: f"{g.outcome_count:,}" if g.outcomes else "-"),
    ("budget blocks", lambda g: f"{g.budget_blocks:,}"),
    ("loops", lambda g: f"{g.loops_blocked:,}"),
    ("retries", lambda g: f"{g.retries:,}"),
    ("tokens", lambda g: f"{g.input_tokens + g.output_tokens:,}"),
)
_ORDER: Final = (
    "calls",
    "hits",
    "spent",
    "saved",
    "tokens",
    "retries",
    "loops",
    "budget blocks",
    "outcomes",
    "$/outcome",
)


def _fitting(report: Report, width: int) -> tuple[list[int], list[str]]:
    """The key columns' widths and the numeric columns that fit in ``width`` (by priority)."""
    rows = [*report.groups, report.total]
    keys = [min(max([len(name), *(len(g.key[i]) for g in rows)]), 18) for i, name in enumerate(report.by)]
    used = sum(k + 3 for k in keys) + 4  # cell padding, column gaps, the table's edges
    chosen: list[str] = []
    for name, cell in _COLUMNS:
        need = max(len(name), *(len(cell(g)) for g in rows)) + 3
        if used + need <= width or not chosen:
            chosen.append(name)
            used += need
    return keys, [name for name in _ORDER if name in chosen]


def print_report(report: Report, console: Console) -> None:
    """The report as a table: one row per group and a total; cost per outcome last. On a
    narrow console the group names and the money come first; the columns that do not fit
    are left to the summary line (and to JSON and CSV)."""
    title = "tokenguard report"
    if report.since or report.until:
        since = report.since.strftime("%Y-%m-%d %H:%M") if report.since else "start"
        until = report.until.strftime("%Y-%m-%d %H:%M") if report.until else "now"
        title += f" ({since} → {until} UTC)"
    key_widths, columns = _fitting(report, console.width)
    cells = dict(_COLUMNS)
    table = Table(title=title, caption=f"store: {report.store}", header_style="bold", box=box.SIMPLE_HEAD)
    for name, width in zip(report.by, key_widths, strict=True):
        table.add_column(name, overflow="fold", min_width=width)
    for name in columns:
        table.add_column(name, justify="right", no_wrap=True, style="bold" if name == "$/outcome" else None)

    def row(group: Group) -> list[str]:
        return [*group.key, *(cells[name](group) for name in columns)]

    for group in report.groups:
        table.add_row(*row(group))
    if report.by and len(report.groups) > 1:
        table.add_section()
        table.add_row(*row(report.total), style="bold")
    console.print(table)
    total = report.total
    hit_rate = total.cache_hit_rate
    rate = "-" if hit_rate is None else f"{hit_rate:.0%}"
    console.print(
        f"spent [bold]{_usd(total.spent_usd)}[/] · saved by the cache [bold green]{_usd(total.saved_usd)}[/] "
        f"({rate} of answers) · retries {total.retries:,} · loops stopped {total.loops_blocked:,} · "
        f"budget blocks {total.budget_blocks:,}"
    )
    if total.estimated or total.unpriced:
        console.print(
            f"[dim]{total.estimated:,} call(s) estimated (streams without usage, timeouts); "
            f"{total.unpriced:,} unpriced (no known price)[/]"
        )


# -- the command line --------------------------------------------------------------------------


class _UserError(click.ClickException):
    """A user's mistake: one line on stderr, exit status 2."""

    exit_code = 2


def _friendly(command: F) -> F:
    """Turn a tokenguard error (a user's mistake) into one line and exit status 2."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except TokenguardError as err:
            raise _UserError(str(err)) from None

    return run  # type: ignore[return-value]


def _configured_store(store: str | None) -> str | None:
    """``--store`` (or ``TOKENGUARD_STORE``) when given, else the configured ``store``
    (tokenguard.toml / pyproject.toml), else ``None``: the default ledger. Every command
    reads the store a guard built from the same configuration would write."""
    if store is not None and not store.strip():
        raise _UserError("--store / TOKENGUARD_STORE: must be a non-empty store URL (or unset)")
    if store:
        return store
    from ._config import load_config

    configured = load_config()["store"]
    return configured if isinstance(configured, str) else None


def _open_store(url: str | None, *, must_exist: bool = False) -> Any:
    """The store to read; with ``must_exist``, a SQLite ledger that is not there is a mistake
    (a typo must not create an empty ledger and report nothing)."""
    from .stores import open_store

    url = _configured_store(url)
    if must_exist and url and url.startswith("sqlite:///"):
        _existing(_ledger_path(url))
    return open_store(url)


def _ledger_path(store: str | None) -> Path:
    """The file of a SQLite ledger URL (the configured ledger for ``None``)."""
    from .stores import default_store_path

    store = _configured_store(store)
    if store is None:
        return default_store_path()
    if not store.startswith("sqlite:///") or len(store) == len("sqlite:///"):
        raise _UserError(f"--store: {redact_url(store)} is not a SQLite ledger (sqlite:///path.db)")
    return Path(store[len("sqlite:///") :]).expanduser()


def _existing(path: Path) -> Path:
    """``path``, if a ledger is there (a typo must not create an empty ledger and report nothing)."""
    if not path.is_file():
        raise _UserError(f"no ledger at {path} (check --store / TOKENGUARD_STORE)")
    return path


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Examples:\n\n\b\n  tokenguard demo\n  tokenguard report --by user,day --since 7d\n"
    "  tokenguard prices gpt-4o",
)
@click.version_option(package_name="tokenguard")
def main() -> None:
    """tokenguard: see, cap and cut what your LLM calls cost."""


@main.command(
    epilog="\b\nExamples:\n  tokenguard report\n  tokenguard report --by project,model --since 2026-11-01\n"
    "  tokenguard report --by day --format csv > spend.csv\n  tokenguard report --html report.html",
)
@click.option(
    "--store",
    envvar="TOKENGUARD_STORE",
    help="Store URL (default: TOKENGUARD_STORE, else the configured store, else the local ledger).",
)
@click.option(
    "--by",
    "by",
    default="user",
    show_default=True,
    help="Group by: user, project, model, day, month, "
    "vendor, endpoint, outcome or any scope attribute; comma-separated.",
)
@click.option("--since", help="From (inclusive): 2026-11-01, 2026-11-01T09:00, or 7d / 12h / 30m ago.")
@click.option("--until", help="Up to (exclusive), same forms as --since.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a self-contained HTML report (with a spend-over-time chart) to this file.",
)
@_friendly
def report(store: str | None, by: str, since: str | None, until: str | None, fmt: str, html_path: Path | None) -> None:
    """Who spent what: spend, savings, retries, loops and blocks, grouped; cost per outcome.

    Never a ranking by token volume: groups come out in the order of their key."""
    console = Console(stderr=fmt != "table")
    opened = _open_store(store, must_exist=True)
    start = parse_when(since, setting="--since")
    end = parse_when(until, setting="--until")
    if start is not None and end is not None and start >= end:
        raise _UserError(f"--since ({start:%Y-%m-%d %H:%M}) must be before --until ({end:%Y-%m-%d %H:%M})")
    with console.status("reading the ledger…") as status:
        result = build_report(
            opened,
            by=by.split(","),
            since=start,
            until=end,
            progress=lambda n: status.update(f"reading the ledger… {n:,} rows"),
        )
    _retention_note(opened, start, end, Console(stderr=True))
    if fmt == "json":
        click.echo(result.to_json())
    elif fmt == "csv":
        click.echo(result.to_csv(), nl=False)
    else:
        print_report(result, console)
    if html_path is not None:
        from ._html import render_html

        try:
            html_path.write_text(render_html(result), encoding="utf-8")
        except OSError as err:
            raise _UserError(f"--html {html_path}: cannot be written: {err.strerror or err}") from None
        console.print(f"wrote {html_path}")
    opened.close()


def _retention_note(store: Any, since: datetime | None, until: datetime | None, console: Console) -> None:
    """Say so when a Redis ledger reported earlier days from its daily tallies."""
    summarised_before = getattr(store, "summarised_before", None)
    if summarised_before is None:
        return
    boundary = summarised_before()
    if boundary is None or (since is not None and since >= boundary):
        return
    partial = [
        f"{name} {when:%Y-%m-%d %H:%M}"
        for name, when in (("--since", since), ("--until", until))
        if when is not None
        and when < boundary
        and (when.hour, when.minute, when.second, when.microsecond) != (0, 0, 0, 0)
    ]
    console.print(
        f"note: the Redis ledger keeps single rows for its last {store.max_rows:,} calls; calls before "
        f"{boundary:%Y-%m-%d} are reported from its daily totals"
        + (f", whole days (so the days of {' and '.join(partial)} count whole)" if partial else "")
    )


@main.command(
    epilog="\b\nExamples:\n  tokenguard demo\n  tokenguard demo --pace 0\n  tokenguard demo --keep ./demo-ledger",
)
@click.option(
    "--pace",
    type=click.FloatRange(min=0, max=5),
    default=None,
    help="Seconds to pause after each event (default: 0.06 on a terminal, 0 otherwise).",
)
@click.option(
    "--keep",
    "store_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the demo's ledger (a new SQLite file each run) in this directory, for tokenguard report --store.",
)
@click.pass_context
def demo(ctx: click.Context, pace: float | None, store_dir: Path | None) -> None:
    """Watch tokenguard work with no API key and no network: a fake OpenAI and Anthropic API on
    loopback, the real SDK clients, and the cache, retry, loop detector and budgets in action."""
    from ._demo import run_demo  # lazily: _demo imports print_report from this module

    console = Console()
    if pace is None:
        pace = 0.06 if console.is_terminal else 0.0
    ctx.exit(run_demo(console, store_dir=store_dir, pace_s=pace))


def _guard_from_config(store: str | None) -> Any:
    """A guard built from the configuration (``tokenguard config``), on ``store`` if given."""
    from ._config import load_config
    from ._guard import Guard

    kwargs = load_config().guard_kwargs()
    if store:
        kwargs["store"] = store
    kwargs["cache"] = False  # commands never need the cache open through the guard
    return Guard(**kwargs)


def _in(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    seconds = max(int((when - now).total_seconds()), 0)
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    return f"{days}d {hours}h" if days else f"{hours}h {rest // 60}m"


@main.command(
    epilog="\b\nExamples:\n  tokenguard budgets\n  TOKENGUARD_STORE=sqlite:////srv/ledger.db tokenguard budgets"
)
@click.option(
    "--store",
    envvar="TOKENGUARD_STORE",
    help="Store URL (default: TOKENGUARD_STORE, else the configured store, else the local ledger).",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@_friendly
def budgets(store: str | None, fmt: str) -> None:
    """The configured budgets (tokenguard.toml / pyproject / TOKENGUARD_BUDGETS): spent, held,
    % used and time to reset, for every user (or other key) that spent this period."""
    guard = _guard_from_config(store)
    statuses = guard.budget_overview()
    now = datetime.now(UTC)
    if fmt == "json":
        click.echo(
            json.dumps(
                [
                    {
                        "budget": s.budget.describe(),
                        "key": s.key,
                        "spent_usd": _plain(s.spent_usd),
                        "held_usd": _plain(s.held_usd),
                        "limit_usd": None if s.budget.usd is None else _plain(s.budget.usd),
                        "spent_tokens": s.spent_tokens,
                        "limit_tokens": s.budget.limit_tokens,
                        "resets_at": None if s.resets_at is None else s.resets_at.isoformat(),
                    }
                    for s in statuses
                ],
                indent=2,
            )
        )
        guard.close()
        return
    console = Console()
    if not statuses:
        if guard._budgets is not None:  # configured, but no key spent or holds anything yet
            console.print("The budgets are configured; nothing has been spent under them this period.")
        else:
            console.print("No budgets are configured. Set them in tokenguard.toml, e.g.\n")
            console.print('[[budgets]]\nlimit_usd = 50\nperiod = "day"\nper = "user"', markup=False)
        guard.close()
        return
    table = Table(title="tokenguard budgets", caption=f"store: {guard.store.url}", header_style="bold")
    for name, justify in (
        ("budget", "left"),
        ("key", "left"),
        ("spent", "right"),
        ("held", "right"),
        ("limit", "right"),
        ("used", "right"),
        ("resets in", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for s in statuses:
        limit = s.budget.usd
        if limit is not None and limit > 0:
            used = (s.spent_usd + s.held_usd) / limit
        elif s.budget.limit_tokens:
            used = Decimal(s.spent_tokens + s.held_tokens) / s.budget.limit_tokens
        else:
            used = Decimal(0)
        style = "red" if used >= 1 else "yellow" if used >= Decimal("0.75") else ""
        table.add_row(
            s.budget.describe(),
            s.key or "-",
            _usd(s.spent_usd),
            _usd(s.held_usd),
            _usd(limit, 2) if limit is not None else f"{s.budget.limit_tokens:,} tok",
            f"[{style}]{used:.0%}[/]" if style else f"{used:.0%}",
            _in(s.resets_at, now),
        )
    console.print(table)
    guard.close()


@main.group(epilog="\b\nExamples:\n  tokenguard cache stats\n  tokenguard cache clear --yes")
def cache() -> None:
    """Inspect or empty the response cache."""


def _open_cache(path: Path | None) -> Any:
    from ._cache import Cache
    from ._config import load_config

    config = load_config()
    configured = config["cache"]
    if path is None and isinstance(configured, str) and configured not in ("disk", "memory"):
        return Cache(configured)  # the shared cache on Redis
    directory = path or config["cache.path"]
    return Cache("disk", path=directory, max_size_mb=config["cache.max_size_mb"])


@cache.command("stats", epilog="\b\nExamples:\n  tokenguard cache stats\n  tokenguard cache stats --path ./cache")
@click.option("--path", type=click.Path(file_okay=False, path_type=Path), help="Cache directory (default: configured).")
@click.option("--store", envvar="TOKENGUARD_STORE", help="Store URL, for hits and savings.")
@_friendly
def cache_stats(path: Path | None, store: str | None) -> None:
    """Entries and size on disk, and the hits and savings the ledger recorded."""
    opened = _open_cache(path)
    entries, size = opened.usage()
    ledger = _open_store(store, must_exist=True)
    stats = ledger.stats(since=None, scope={})
    ledger.close()
    answered = stats.calls - stats.blocked - stats.errors
    console = Console()
    if opened.remote:
        console.print(f"cache            {opened.backend_name} (shared; Redis's maxmemory bounds it)")
        console.print(f"entries          {entries:,}  ({size / 1_048_576:.1f} MB)")
    else:
        console.print(f"cache directory  {opened.path}")
        console.print(f"entries          {entries:,}  ({size / 1_048_576:.1f} MB of {opened.max_size_mb:g} MB at most)")
    console.print(f"hits             {stats.cache_hits:,} of {answered:,} answers ({stats.cache_hit_rate:.0%})")
    console.print(f"saved            {_usd(stats.saved_usd)}")
    opened.close()


@cache.command("clear", epilog="\b\nExamples:\n  tokenguard cache clear\n  tokenguard cache clear --yes --path ./cache")
@click.option("--path", type=click.Path(file_okay=False, path_type=Path), help="Cache directory (default: configured).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_friendly
def cache_clear(path: Path | None, yes: bool) -> None:
    """Drop every cached answer (the ledger keeps its rows)."""
    opened = _open_cache(path)
    where = opened.backend_name if opened.remote else opened.path
    if not yes:
        click.confirm(f"Drop every entry in {where}?", abort=True)
    opened.clear()
    click.echo(f"cleared {where}")
    opened.close()


@main.group(
    epilog="\b\nExamples:\n  tokenguard ledger check\n  tokenguard ledger recover ledger.db ledger-recovered.db"
)
def ledger() -> None:
    """Check a SQLite ledger, or recover the rows of a damaged one."""


@ledger.command(
    "check", epilog="\b\nExamples:\n  tokenguard ledger check\n  tokenguard ledger check --store sqlite:///app.db"
)
@click.option("--store", envvar="TOKENGUARD_STORE", help="The ledger (sqlite:///path.db; default: configured).")
@_friendly
def ledger_check(store: str | None) -> None:
    """Run SQLite's integrity check on the ledger, read-only. Exit status 1 if it is damaged."""
    import sqlite3

    path = _existing(_ledger_path(store))
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            problems = [row[0] for row in conn.execute("PRAGMA integrity_check(20)")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        problems = [str(err)]
    if problems == ["ok"]:
        click.echo(f"{path}: ok")
        return
    click.echo(f"{path} is damaged:", err=True)
    for problem in problems:
        for line in problem.splitlines():
            click.echo(f"  {line}", err=True)
    click.echo(
        f"Recover what can be read: tokenguard ledger recover {path} {path.with_name(path.stem + '-recovered.db')}",
        err=True,
    )
    sys.exit(1)


@ledger.command(
    "recover",
    epilog="\b\nExamples:\n  tokenguard ledger recover ~/.local/share/tokenguard/ledger.db /tmp/ledger-recovered.db",
)
@click.argument("broken", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("new", type=click.Path(dir_okay=False, path_type=Path))
@_friendly
def ledger_recover(broken: Path, new: Path) -> None:
    """Copy every readable row of a damaged ledger BROKEN into a new ledger NEW.

    BROKEN is only read. Calls and outcomes are copied row by row, so a damaged page loses only
    its own rows; budgets keep their settled spend where it can be read. Stop the programs
    that use the ledger first; then move NEW into BROKEN's place (with BROKEN's -wal and -shm
    files moved away).
    """
    from .stores.sqlite import recover_ledger

    report = recover_ledger(broken, new)
    for part in report:
        if part.table in ("calls", "outcomes"):
            lost = "unknown (the last rows cannot be read)" if part.missing is None else f"{part.missing:,} at most"
            click.echo(f"{part.table:<14} {part.copied:>10,} rows copied; lost: {lost}")
        else:
            state = "all read" if part.complete else "the rest could not be read (those keys restart at $0)"
            click.echo(f"{part.table:<14} {part.copied:>10,} rows copied; {state}")
    click.echo(f"wrote {new}; {broken} is unchanged")


def _vendor_of(model: str, vendor: str | None) -> str:
    if vendor:
        return vendor
    return "anthropic" if model.startswith("claude") else "openai"


@main.command(
    epilog="\b\nExamples:\n  tokenguard prices gpt-4o\n  tokenguard prices claude-sonnet-4-6\n"
    "  tokenguard prices gpt-4o --vendor azure"
)
@click.argument("model")
@click.option("--vendor", type=click.Choice(["openai", "anthropic", "azure"]), help="Default: from the model name.")
@_friendly
def prices(model: str, vendor: str | None) -> None:
    """A model's prices per million tokens, from genai-prices."""
    from ._pricing import PriceBook

    who = _vendor_of(model, vendor)
    card = PriceBook().card(who, model)
    if card is None:
        raise _UserError(f"genai-prices knows no price for {who} model {model!r} (try --vendor, or another name)")
    price = card.model_price
    rows = (
        ("input", price.input_mtok),
        ("output", price.output_mtok),
        ("cached input (read)", price.cache_read_mtok),
        ("cache write (5 min)", price.cache_write_mtok),
        ("cache write (1 h)", price.cache_write_1h_mtok),
    )
    table = Table(title=f"{who} {model}", caption=f"genai-prices id: {card.model_id}", header_style="bold")
    table.add_column("tokens")
    table.add_column("USD per 1M", justify="right")
    table.add_column("above the tier", justify="right")
    for name, value in rows:
        if value is None:
            continue
        base = getattr(value, "base", value)
        tiers = getattr(value, "tiers", None) or []
        above = ", ".join(f"${t.price} from {t.start:,}" for t in tiers)
        table.add_row(name, f"${base}", above or "-")
    console = Console()
    console.print(table)
    if card.context_window:
        console.print(f"[dim]context window: {card.context_window:,} tokens[/]")


@main.command(
    epilog='\b\nExamples:\n  tokenguard estimate --model gpt-4o --max-tokens 500 "Summarise this report..."\n'
    "  tokenguard estimate --model claude-sonnet-4-6 --max-tokens 1024 --file prompt.txt\n"
    "  tokenguard estimate --request request.json"
)
@click.argument("prompt", required=False)
@click.option("--model", help="The model (required unless --request gives it).")
@click.option("--vendor", type=click.Choice(["openai", "anthropic", "azure"]), help="Default: from the model name.")
@click.option(
    "--max-tokens", type=click.IntRange(min=1), help="The output bound (default: the model's context window)."
)
@click.option("--file", "prompt_file", type=click.File("r", encoding="utf-8"), help="Read the prompt from a file.")
@click.option(
    "--request",
    "request_file",
    type=click.File("r", encoding="utf-8"),
    help="A whole request body as JSON (chat completions or messages).",
)
@_friendly
def estimate(
    prompt: str | None,
    model: str | None,
    vendor: str | None,
    max_tokens: int | None,
    prompt_file: Any,
    request_file: Any,
) -> None:
    """The worst-case cost of a request before sending it: what a budget reserves for it."""
    from ._errors import ConfigurationError
    from ._pricing import PriceBook
    from ._tokens import count_messages_tokens, tiktoken_encoding
    from .providers import AnthropicAdapter, OpenAIAdapter
    from .providers.anthropic import MESSAGES
    from .providers.openai import CHAT

    if request_file is not None:
        try:
            body = json.load(request_file)
        except ValueError as err:
            raise ConfigurationError("--request", request_file.name, f"is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise ConfigurationError("--request", request_file.name, "must hold a JSON object")
    else:
        text = prompt_file.read() if prompt_file is not None else prompt
        if text is None:
            raise _UserError("give the prompt as an argument, or --file prompt.txt, or --request request.json")
        body = {"messages": [{"role": "user", "content": text}]}
    model = model or body.get("model")
    if not isinstance(model, str) or not model:
        raise _UserError('name the model: --model gpt-4o (or a "model" in --request)')
    body["model"] = model
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    who = _vendor_of(model, vendor)
    if who == "anthropic":
        adapter: Any = AnthropicAdapter()
        endpoint = MESSAGES
    else:
        adapter = OpenAIAdapter(who)
        endpoint = CHAT
    card = PriceBook().card(who, model)
    if card is None:
        raise _UserError(f"genai-prices knows no price for {who} model {model!r} (try --vendor, or another name)")
    input_bound = adapter.input_bound(endpoint, body)
    output_bound = adapter.output_bound(endpoint, body)
    output = output_bound or card.context_window or 32_768
    worst = card.worst_case(input_bound, output)
    console = Console()
    console.print(f"{who} {model}")
    console.print(f"  input   ≤ {input_bound:,} tokens (bounded from the request's bytes)")
    if tiktoken_encoding(model) is not None:
        texts, messages = adapter.input_texts(endpoint, body)
        console.print(f"          = {count_messages_tokens(texts, model, messages=messages):,} tokens counted exactly")
    source = "max_tokens" if output_bound else "the context window" if card.context_window else "the default bound"
    console.print(f"  output  ≤ {output:,} tokens ({source})")
    console.print(f"  [bold]worst case ${_plain(worst)}[/]  — what a budget reserves before the call is sent")


@main.command("config", epilog="\b\nExamples:\n  tokenguard config\n  TOKENGUARD_CACHE=memory tokenguard config")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@_friendly
def config_command(fmt: str) -> None:
    """The default guard's effective configuration, and where each value came from
    (environment, tokenguard.toml, pyproject.toml [tool.tokenguard], or the default)."""
    from ._config import KEYS, load_config

    loaded = load_config()
    loaded.guard_kwargs()  # invalid values are reported now, naming the key
    if fmt == "json":
        shown = {k: {"value": _shown(k, s.value), "source": s.source} for k, s in loaded.settings.items()}
        click.echo(json.dumps(shown, indent=2, default=str))
        return
    console = Console()
    wide = console.width >= _WIDE
    table = Table(title="tokenguard configuration", header_style="bold", box=box.SIMPLE_HEAD)
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("from")
    if wide:
        table.add_column("environment variable", style="dim", no_wrap=True)
    for key, setting in loaded.settings.items():
        value = Text("(unset)" if setting.value is None else str(_shown(key, setting.value)))
        if setting.source != "default":
            value.stylize("bold")
        cells: list[Any] = [key, value, Text(setting.source)]
        if wide:
            cells.append(KEYS[key].env)
        table.add_row(*cells)
    console.print(table)
    if not wide:
        console.print("[dim]environment variables: TOKENGUARD_ + the key in capitals, dots as underscores[/]")


def _shown(key: str, value: Any) -> Any:
    """A configuration value fit to show: a webhook URL redacted (it may carry a token)."""
    return redact_url(str(value), keep_path=False) if key == "alerts.webhook" and value else value


def run() -> None:
    """The console-script entry point."""
    main(prog_name="tokenguard")


if __name__ == "__main__":  # pragma: no cover
    run()
