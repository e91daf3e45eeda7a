"""The ``tokenguard`` command: a demo anyone can run, reports people read, budgets, the cache,
prices, estimates and the effective configuration.

Every command reads the store named by ``--store`` or ``TOKENGUARD_STORE`` (default: the
ledger in the user data directory). A user's mistake (a bad date, an unknown model, a
store that cannot be opened) is one clear line on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from ._errors import TokenguardError
from ._report import Group, Report, build_report, parse_when

__all__ = ["main", "print_report"]

F = TypeVar("F", bound=Callable[..., Any])


def _usd(amount: Decimal | None, places: int = 4) -> str:
    if amount is None:
        return "-"
    return f"${amount:,.{places}f}"


def _row(group: Group, by: Sequence[str]) -> list[str]:
    cost = group.cost_per_outcome
    return [
        *group.key,
        f"{group.calls:,}",
        f"{group.cache_hits:,}",
        _usd(group.spent_usd),
        _usd(group.saved_usd),
        f"{group.input_tokens:,}",
        f"{group.output_tokens:,}",
        f"{group.retries:,}",
        f"{group.loops_blocked:,}",
        f"{group.budget_blocks:,}",
        f"{group.outcome_count:,}" if group.outcomes else "-",
        _usd(cost),
    ]


def print_report(report: Report, console: Console) -> None:
    """The report as a table: one row per group and a total; cost per outcome last."""
    title = "tokenguard report"
    if report.since or report.until:
        since = report.since.strftime("%Y-%m-%d %H:%M") if report.since else "start"
        until = report.until.strftime("%Y-%m-%d %H:%M") if report.until else "now"
        title += f" ({since} → {until} UTC)"
    table = Table(title=title, caption=f"store: {report.store}", header_style="bold")
    for name in report.by:
        table.add_column(name)
    for name in ("calls", "cache hits", "spent", "saved", "input tok", "output tok", "retries", "loops", "budget"):
        table.add_column(name, justify="right")
    table.add_column("outcomes", justify="right")
    table.add_column("cost/outcome", justify="right", style="bold")
    for group in report.groups:
        table.add_row(*_row(group, report.by))
    if report.by and len(report.groups) > 1:
        table.add_section()
        table.add_row(*_row(report.total, report.by), style="bold")
    console.print(table)
    total = report.total
    answered = total.sent + total.cache_hits
    rate = f"{total.cache_hits / answered:.0%}" if answered else "-"
    console.print(
        f"spent [bold]{_usd(total.spent_usd)}[/]  ·  saved by the cache [bold green]{_usd(total.saved_usd)}[/] "
        f"({rate} of answers)  ·  retries {total.retries:,}  ·  loops stopped {total.loops_blocked:,}  ·  "
        f"budget blocks {total.budget_blocks:,}"
    )
    if total.estimated or total.unpriced:
        console.print(
            f"[dim]{total.estimated:,} call(s) estimated (streams without usage, timeouts); "
            f"{total.unpriced:,} unpriced (no known price)[/]"
        )


# -- the command line --------------------------------------------------------------------------


def _friendly(command: F) -> F:
    """Turn a tokenguard error (a user's mistake) into one line and exit status 2."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except TokenguardError as err:
            raise click.ClickException(str(err)) from None

    return run  # type: ignore[return-value]


def _open_store(url: str | None) -> Any:
    from .stores import open_store

    return open_store(url)


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
    "--store", envvar="TOKENGUARD_STORE", help="Store URL (default: TOKENGUARD_STORE, else the local ledger)."
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
    """Spend, tokens, calls, cache savings, retries, loops and budget blocks, grouped; and the
    cost per recorded outcome (never a ranking by token volume)."""
    console = Console(stderr=fmt != "table")
    opened = _open_store(store)
    start = parse_when(since, setting="--since")
    end = parse_when(until, setting="--until")
    with console.status("reading the ledger…") as status:
        result = build_report(
            opened,
            by=by.split(","),
            since=start,
            until=end,
            progress=lambda n: status.update(f"reading the ledger… {n:,} rows"),
        )
    if fmt == "json":
        click.echo(result.to_json())
    elif fmt == "csv":
        click.echo(result.to_csv(), nl=False)
    else:
        print_report(result, console)
    if html_path is not None:
        from ._html import render_html

        html_path.write_text(render_html(result), encoding="utf-8")
        console.print(f"wrote {html_path}")
    opened.close()


def run() -> None:
    """The console-script entry point."""
    main(prog_name="tokenguard")


if __name__ == "__main__":  # pragma: no cover
    run()
