"""The documentation site stays honest: every setting, default, environment variable, command,
option and public name is documented, and ``mkdocs build --strict`` passes."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest

import tokenguard
import tokenguard.pytest_plugin
import tokenguard.testing
from tokenguard._config import KEYS, load_config
from tokenguard.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "tokenguard"

_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _sections(page: str) -> list[tuple[str, str]]:
    """(heading, text up to the next heading) for each heading of a Markdown page; the text before
    the first heading comes first, under the heading ``""``. Headings inside code fences are text."""
    text = (DOCS / page).read_text(encoding="utf-8")
    sections: list[tuple[str, list[str]]] = [("", [])]
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        heading = None if fenced else _HEADING.match(line)
        if heading:
            sections.append((heading.group(2).strip(), []))
        else:
            sections[-1][1].append(line)
    return [(heading, "\n".join(lines)) for heading, lines in sections]


def _section(page: str, marker: str) -> str:
    """The one section of ``page`` whose heading contains ``marker``."""
    found = [body for heading, body in _sections(page) if marker in heading]
    assert len(found) == 1, f"{page}: expected one heading containing {marker!r}, found {len(found)}"
    return found[0]


def _rows(section: str) -> dict[str, list[str]]:
    """The rows of the Markdown tables in ``section`` whose first cell is a name in backticks,
    by that name; each row's cells with their backticks."""
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        name = re.fullmatch(r"`([^`]+)`", cells[0])
        if name:
            rows[name.group(1)] = cells
    return rows


def _code(cell: str) -> str:
    """The text of a cell that is one code span (``"`4`"`` -> ``"4"``)."""
    found = re.fullmatch(r"`([^`]*)`", cell)
    assert found, f"expected one code span, got {cell!r}"
    return found.group(1)


# -- the configuration reference -----------------------------------------------------------------

# (a heading of docs/configuration.md, the object whose signature its table documents)
CONFIG_OBJECTS: list[tuple[str, Callable[..., Any]]] = [
    ("`Guard`", tokenguard.Guard),
    ("`Budget`", tokenguard.Budget),
    ("`SpendRate`", tokenguard.SpendRate),
    ("`WebhookAlerts`", tokenguard.WebhookAlerts),
    ("`Cache`", tokenguard.Cache),
    ("`cache_control`", tokenguard.cache_control),
    ("`Retry`", tokenguard.Retry),
    ("`CircuitBreaker`", tokenguard.CircuitBreaker),
    ("`LoopDetector`", tokenguard.LoopDetector),
    ("`@guarded`", tokenguard.guarded),
    ("`register_price`", tokenguard.register_price),
]


def _parameters() -> Iterator[tuple[str, inspect.Parameter]]:
    for heading, obj in CONFIG_OBJECTS:
        for parameter in inspect.signature(obj).parameters.values():
            yield heading, parameter


def _row_name(parameter: inspect.Parameter) -> str:
    if parameter.kind is inspect.Parameter.VAR_KEYWORD:
        return f"**{parameter.name}"
    if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
        return f"*{parameter.name}"
    return parameter.name


def _documented_default(cell: str, default: Any) -> bool:
    """Whether the default column ``cell`` says ``default``: a Python literal equal to it (a bool
    for a bool), or, for a function, its dotted name."""
    if default is inspect.Parameter.empty:
        return cell == "required"
    text = _code(cell)
    if callable(default):
        return text == f"{default.__module__}.{default.__qualname__}"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return False
    return value == default and isinstance(value, bool) == isinstance(default, bool)


@pytest.mark.parametrize(
    ("heading", "parameter"), list(_parameters()), ids=lambda v: v if isinstance(v, str) else v.name
)
def test_every_parameter_is_in_the_configuration_reference_with_its_default(
    heading: str, parameter: inspect.Parameter
) -> None:
    """Each parameter of each configuration object has a row in its table of configuration.md,
    and the row's default is the signature's default."""
    rows = _rows(_section("configuration.md", heading))
    name = _row_name(parameter)
    assert name in rows, f"configuration.md {heading}: no row for `{name}`"
    if parameter.kind is inspect.Parameter.VAR_KEYWORD:
        return
    default = rows[name][2]
    assert _documented_default(default, parameter.default), (
        f"configuration.md {heading} `{name}`: default {default} but the code says {parameter.default!r}"
    )


@pytest.mark.parametrize("heading", [h for h, _ in CONFIG_OBJECTS])
def test_the_configuration_reference_documents_no_parameter_the_code_lacks(heading: str) -> None:
    """A table of configuration.md has no row for a parameter that is not in the signature."""
    obj = dict(CONFIG_OBJECTS)[heading]
    names = {_row_name(p) for p in inspect.signature(obj).parameters.values()}
    extra = set(_rows(_section("configuration.md", heading))) - names
    assert not extra, f"configuration.md {heading}: rows for unknown parameters {sorted(extra)}"


def _environment_variables() -> set[str]:
    """Every ``TOKENGUARD_*`` name the source spells out, and every configuration key's variable."""
    spelled = {
        name
        for path in SRC.rglob("*.py")
        for name in re.findall(r"\bTOKENGUARD_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8"))
    }
    return spelled | {key.env for key in KEYS.values()}


def test_every_environment_variable_is_in_the_configuration_reference() -> None:
    """Every TOKENGUARD_* variable of the code appears in configuration.md."""
    names = _environment_variables()
    assert {"TOKENGUARD_STORE", "TOKENGUARD_CONFIG", "TOKENGUARD_RETRY_ATTEMPTS"} <= names
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    missing = sorted(name for name in names if f"`{name}`" not in text)
    assert not missing, f"configuration.md does not mention {missing}"


def _config_default(cell: str, default: Any) -> bool:
    """Whether the Keys table's default column says ``default``, spelled as a user writes it."""
    text = _code(cell)
    if default is None:
        return text == "(unset)"
    if isinstance(default, bool):
        return text == str(default).lower()
    if isinstance(default, int | float):
        return float(text) == default
    if isinstance(default, list):
        return bool(json.loads(text) == default)
    return bool(text == default)


@pytest.mark.parametrize("key", list(KEYS))
def test_every_configuration_key_is_in_the_keys_table(key: str) -> None:
    """Each configuration key of the default guard has a row with its variable and its default."""
    rows = _rows(_section("configuration.md", "Keys"))
    assert key in rows, f"configuration.md Keys: no row for `{key}`"
    spec = KEYS[key]
    _, variable, default, *_ = rows[key]
    assert _code(variable) == spec.env
    assert _config_default(default, spec.default), f"`{key}`: default {default}, the code says {spec.default!r}"


_SOURCES = {"tokenguard.toml": "tokenguard.toml", "pyproject.toml": "pyproject.toml [tool.tokenguard]"}


@pytest.mark.parametrize("place", list(_SOURCES))
def test_the_configuration_file_examples_are_valid(place: str, tmp_path: Path) -> None:
    """The `tokenguard.toml` and `pyproject.toml` examples of configuration.md load, set only known
    keys, and make valid budgets."""
    examples = re.findall(r"```toml\n(.*?)```", (DOCS / "configuration.md").read_text(encoding="utf-8"), flags=re.S)
    [example] = [text for text in examples if ("[tool.tokenguard" in text) == (place == "pyproject.toml")]
    (tmp_path / place).write_text(example, encoding="utf-8")
    config = load_config(cwd=tmp_path, environ={})
    assert _SOURCES[place] in {setting.source for setting in config.settings.values()}
    assert config["budgets"]
    for table in config["budgets"]:
        tokenguard.Budget(**table)


def test_the_budgets_environment_example_is_valid(tmp_path: Path) -> None:
    """The TOKENGUARD_BUDGETS example of configuration.md is a JSON list of valid budgets."""
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    [value] = re.findall(r"`TOKENGUARD_BUDGETS='([^']+)'`", text)
    config = load_config(cwd=tmp_path, environ={"TOKENGUARD_BUDGETS": value})
    assert [tokenguard.Budget(**table).describe() for table in config["budgets"]] == ["$50/day per user"]


def test_every_redis_url_option_is_documented() -> None:
    """Each query option the Redis store understands has a row in configuration.md."""
    from tokenguard.stores.redis_store import _OPTIONS

    rows = _rows(_section("configuration.md", "Redis store options"))
    assert set(_OPTIONS) == set(rows)


# -- the command line ------------------------------------------------------------------------------


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    yield " ".join(prefix), group
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), command


COMMANDS = list(_commands(cli_main))


def test_the_command_tree_is_walked() -> None:
    """The walk finds the commands `tokenguard --help` lists, and the subcommands of the groups."""
    paths = {path for path, _ in COMMANDS}
    assert {"", "demo", "report", "budgets", "cache stats", "cache clear", "ledger check", "ledger recover"} <= paths


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[path or "tokenguard" for path, _ in COMMANDS])
def test_every_command_and_option_is_in_the_cli_reference(path: str, command: click.Command) -> None:
    """cli.md has a section per command (`tokenguard PATH`) naming each of its options, arguments
    and choices; the options of `tokenguard` itself (and -h / --help) are in the page's first section."""
    section = _section("cli.md", f"`tokenguard {path}`" if path else "The `tokenguard` command")
    if not path:
        assert "`-h`" in section
        assert "`--help`" in section
    for parameter in command.params:
        if isinstance(parameter, click.Argument):
            names = [parameter.human_readable_name]
        else:
            names = [*parameter.opts, *parameter.secondary_opts]
        for name in names:
            assert re.search(rf"`{re.escape(name)}[` ]", section), f"cli.md `tokenguard {path}`: {name} missing"
        if isinstance(parameter.type, click.Choice):
            for choice in parameter.type.choices:
                assert f"`{choice}`" in section, f"cli.md `tokenguard {path}` {names[0]}: choice {choice} missing"


# -- the API reference -----------------------------------------------------------------------------


def _directives() -> set[str]:
    """The objects the API reference pages render (``::: tokenguard.Guard``)."""
    return {
        target
        for page in (DOCS / "reference").glob("*.md")
        for target in re.findall(r"^::: (\S+)", page.read_text(encoding="utf-8"), flags=re.M)
    }


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("tokenguard", tokenguard.__all__),
        ("tokenguard.testing", tokenguard.testing.__all__),
        ("tokenguard.pytest_plugin", tokenguard.pytest_plugin.__all__),
    ],
)
def test_every_public_name_is_in_the_api_reference(module: str, names: list[str]) -> None:
    """Each name of a public module's __all__ is rendered by a ``::: module.name`` directive."""
    rendered = _directives()
    missing = sorted(name for name in names if f"{module}.{name}" not in rendered)
    assert not missing, f"docs/reference has no directive for {module}.{missing}"


def test_the_readme_links_to_pages_that_exist() -> None:
    """Every docs/ page README.md links to is there (the site's pages are the README's map)."""
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", (ROOT / "README.md").read_text(encoding="utf-8")))
    missing = sorted(link for link in linked if not (ROOT / link).exists())
    assert not missing, f"README.md links to missing pages: {missing}"


# -- the site builds -------------------------------------------------------------------------------


_SITE_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


@pytest.mark.skipif(
    any(importlib.util.find_spec(name.split(".")[0]) is None for name in _SITE_PACKAGES),
    reason="the docs tools are not installed (pip install -e '.[docs]')",
)
def test_the_site_builds_with_no_warning(tmp_path: Path) -> None:
    """`mkdocs build --strict` (every warning an error: broken links and anchors, pages missing
    from the nav, snippets that name no file, docstrings griffe cannot read) succeeds."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "guard" / "index.html").is_file()
