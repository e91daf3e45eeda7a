"""The default guard's configuration (``tokenguard._config.load_config``): every key type from
every source, the order of the sources, the objects ``Config.guard_kwargs()`` builds, errors
naming the key and its source, ``tokenguard.default_guard()`` built from ``tokenguard.toml``,
and the validation of ``tokenguard.record_outcome``.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import tokenguard
from tokenguard._config import KEYS, Config, load_config
from tokenguard._report import build_report


def load(tmp_path: Path, *, toml: str | None = None, pyproject: str | None = None, **env: str) -> Config:
    """``load_config`` in ``tmp_path`` with these files and only these environment variables."""
    if toml is not None:
        (tmp_path / "tokenguard.toml").write_text(toml, encoding="utf-8")
    if pyproject is not None:
        (tmp_path / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    return load_config(cwd=tmp_path, environ=env)


def refused(tmp_path: Path, *, toml: str | None = None, pyproject: str | None = None, **env: str) -> str:
    """The message of the ConfigurationError that loading (and building the guard's objects) raises."""
    with pytest.raises(tokenguard.ConfigurationError) as caught:
        load(tmp_path, toml=toml, pyproject=pyproject, **env).guard_kwargs()
    return str(caught.value)


# -- defaults and the order of the sources ---------------------------------------------------------


def test_defaults_without_any_source(tmp_path: Path) -> None:
    """No file, no variable: every key has its default, from "default"."""
    config = load(tmp_path)
    assert list(config.settings) == list(KEYS)
    for key, spec in KEYS.items():
        assert config.settings[key].source == "default"
        assert config[key] == spec.default
    assert (config["retry"], config["retry.attempts"], config["cache"], config["loops"]) == (True, 4, False, False)


def test_key_environment_variables() -> None:
    """Each key's variable is TOKENGUARD_ and the key upper-cased, dots as underscores."""
    assert KEYS["retry.attempts"].env == "TOKENGUARD_RETRY_ATTEMPTS"
    assert KEYS["cache.share_across_keys"].env == "TOKENGUARD_CACHE_SHARE_ACROSS_KEYS"
    assert KEYS["alerts.webhook"].env == "TOKENGUARD_ALERTS_WEBHOOK"
    assert KEYS["store"].env == "TOKENGUARD_STORE"


def test_environment_beats_toml_beats_pyproject_beats_default(tmp_path: Path) -> None:
    """A key set in several sources takes the first: environment, tokenguard.toml,
    [tool.tokenguard] in pyproject.toml, the default; each value says where it came from."""
    config = load(
        tmp_path,
        toml="[retry]\nattempts = 8\nmax_delay_s = 20\n",
        pyproject="[tool.tokenguard.retry]\nattempts = 7\nmax_delay_s = 10\ninitial_delay_s = 0.25\n",
        TOKENGUARD_RETRY_ATTEMPTS="9",
    )
    assert (config["retry.attempts"], config.settings["retry.attempts"].source) == (9, "env TOKENGUARD_RETRY_ATTEMPTS")
    assert (config["retry.max_delay_s"], config.settings["retry.max_delay_s"].source) == (20.0, "tokenguard.toml")
    initial = config.settings["retry.initial_delay_s"]
    assert (initial.value, initial.source) == (0.25, "pyproject.toml [tool.tokenguard]")
    assert (config["retry.deadline_s"], config.settings["retry.deadline_s"].source) == (120.0, "default")


def test_pyproject_without_the_table_is_ignored(tmp_path: Path) -> None:
    """A pyproject.toml without [tool.tokenguard] (or with other tools' tables) changes nothing."""
    config = load(tmp_path, pyproject='[project]\nname = "app"\n[tool.ruff]\nline-length = 99\n')
    assert all(s.source == "default" for s in config.settings.values())


def test_tokenguard_config_names_another_file(tmp_path: Path) -> None:
    """TOKENGUARD_CONFIG names the file read instead of ./tokenguard.toml; it is the source."""
    other = tmp_path / "conf" / "tg.toml"
    other.parent.mkdir()
    other.write_text("loops = true\n", encoding="utf-8")
    config = load(tmp_path, toml="otel = true\n", TOKENGUARD_CONFIG=str(other))
    assert (config["loops"], config.settings["loops"].source) == (True, str(other))
    assert config["otel"] is False  # ./tokenguard.toml is not read


def test_tokenguard_config_missing_file(tmp_path: Path) -> None:
    """TOKENGUARD_CONFIG naming no file is an error naming TOKENGUARD_CONFIG and the path."""
    message = refused(tmp_path, TOKENGUARD_CONFIG=str(tmp_path / "missing.toml"))
    assert message.startswith("TOKENGUARD_CONFIG=")
    assert "missing.toml" in message


@pytest.mark.parametrize(
    ("toml", "pyproject", "named"),
    [
        ("store = [\n", None, "tokenguard.toml"),
        (None, "[tool.tokenguard\n", "pyproject.toml"),
        (None, "[tool]\ntokenguard = 3\n", "[tool.tokenguard]"),
    ],
    ids=["broken-toml", "broken-pyproject", "not-a-table"],
)
def test_unreadable_files(tmp_path: Path, toml: str | None, pyproject: str | None, named: str) -> None:
    """A file that is not TOML, or a [tool.tokenguard] that is not a table, is an error naming it."""
    assert named in refused(tmp_path, toml=toml, pyproject=pyproject)


@pytest.mark.parametrize(
    ("toml", "pyproject", "named"),
    [
        ("cach = true\n", None, "cach (tokenguard.toml)"),
        ("[retry]\nattempt = 3\n", None, "retry.attempt (tokenguard.toml)"),
        (None, "[tool.tokenguard]\ncach = true\n", "cach (pyproject.toml [tool.tokenguard])"),
        ("[alert]\nwebhook = 'https://x.test'\n", None, "alert.webhook (tokenguard.toml)"),
    ],
)
def test_unknown_keys(tmp_path: Path, toml: str | None, pyproject: str | None, named: str) -> None:
    """A key tokenguard does not know is an error naming it (dotted) and its file, listing the known keys."""
    message = refused(tmp_path, toml=toml, pyproject=pyproject)
    assert message.startswith(named)
    assert "is not a tokenguard setting" in message
    assert "retry.attempts" in message


def test_unknown_environment_variables_are_ignored(tmp_path: Path) -> None:
    """A TOKENGUARD_ variable that is no key (TOKENGUARD_CACH) is not an error: the environment
    holds other programs' variables too."""
    assert load(tmp_path, TOKENGUARD_CACH="1")["cache"] is False


# -- every key type --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1", "true", "True", "TRUE", "yes", "Yes", "on", "ON", " on "])
def test_bool_true_spellings(tmp_path: Path, text: str) -> None:
    """Booleans from the environment: 1, true, yes, on, in any case, spaces ignored."""
    config = load(tmp_path, TOKENGUARD_LOOPS=text, TOKENGUARD_OTEL=text, TOKENGUARD_REQUIRE_PRICES=text)
    assert config["loops"] is config["otel"] is config["require_prices"] is True


@pytest.mark.parametrize("text", ["0", "false", "False", "FALSE", "no", "No", "off", "OFF", "", " off "])
def test_bool_false_spellings(tmp_path: Path, text: str) -> None:
    """Booleans from the environment: 0, false, no, off and empty, in any case."""
    config = load(tmp_path, TOKENGUARD_RETRY=text, TOKENGUARD_CACHE_CACHE_ALL=text)
    assert config["retry"] is config["cache.cache_all"] is False
    assert config.settings["retry"].source == "env TOKENGUARD_RETRY"
    assert config.guard_kwargs()["retry"] is False


def test_bools_from_toml(tmp_path: Path) -> None:
    """TOML booleans, and the same spellings as strings."""
    config = load(tmp_path, toml='loops = true\notel = "yes"\nrequire_prices = "off"\nretry = false\n')
    assert (config["loops"], config["otel"], config["require_prices"], config["retry"]) == (True, True, False, False)


@pytest.mark.parametrize("text", ["2", "maybe", "tru", "none"])
def test_bad_bool(tmp_path: Path, text: str) -> None:
    """Anything else is an error naming the key, the variable and the value."""
    message = refused(tmp_path, TOKENGUARD_OTEL=text)
    assert message.startswith(f"otel (env TOKENGUARD_OTEL)={text!r}")
    assert "true or false" in message


def test_bad_bool_in_toml(tmp_path: Path) -> None:
    """A number where a boolean belongs, in TOML, names the key and the file."""
    assert refused(tmp_path, toml="loops = 1\n").startswith("loops (tokenguard.toml)=1")


@pytest.mark.parametrize(("text", "value"), [("3600", 3600.0), ("0.5", 0.5), ("1e3", 1000.0), (" 42 ", 42.0)])
def test_numbers_from_the_environment(tmp_path: Path, text: str, value: float) -> None:
    """Numbers: integers, decimals and exponents, as floats."""
    config = load(tmp_path, TOKENGUARD_CACHE_TTL_S=text, TOKENGUARD_LOOPS_WINDOW_S=text)
    assert config["cache.ttl_s"] == config["loops.window_s"] == value
    assert isinstance(config["cache.ttl_s"], float)


def test_numbers_from_toml(tmp_path: Path) -> None:
    """TOML integers and floats are read as floats; whole-number keys take integers (and
    whole floats)."""
    config = load(tmp_path, toml="[cache]\nttl_s = 60\nmax_size_mb = 1.5\n[loops]\nmax_repeats = 2.0\n")
    assert (config["cache.ttl_s"], config["cache.max_size_mb"], config["loops.max_repeats"]) == (60.0, 1.5, 2)
    assert isinstance(config["loops.max_repeats"], int)


@pytest.mark.parametrize("text", ["abc", "nan", "inf", "-inf", "1,5"])
def test_bad_numbers(tmp_path: Path, text: str) -> None:
    """Not a finite number: an error naming the key and its variable."""
    message = refused(tmp_path, TOKENGUARD_RETRY_MAX_DELAY_S=text)
    assert message.startswith(f"retry.max_delay_s (env TOKENGUARD_RETRY_MAX_DELAY_S)={text!r}: ")


def test_bool_is_not_a_number(tmp_path: Path) -> None:
    """TOML true where a number belongs is an error, not 1."""
    assert "must be a number" in refused(tmp_path, toml="[cache]\nttl_s = true\n")


@pytest.mark.parametrize(("text", "value"), [("7", 7), ("100", 100), (" 3 ", 3)])
def test_whole_numbers(tmp_path: Path, text: str, value: int) -> None:
    """Whole-number keys (retry.attempts, loops.max_repeats) are ints."""
    config = load(tmp_path, TOKENGUARD_RETRY_ATTEMPTS=text, TOKENGUARD_LOOPS_MAX_REPEATS=text)
    assert config["retry.attempts"] == config["loops.max_repeats"] == value


@pytest.mark.parametrize("text", ["zero", "7.5", "", "2.5e0"])
def test_bad_whole_numbers(tmp_path: Path, text: str) -> None:
    """Not a whole number: an error naming the key and its variable."""
    message = refused(tmp_path, TOKENGUARD_RETRY_ATTEMPTS=text)
    assert message == f"retry.attempts (env TOKENGUARD_RETRY_ATTEMPTS)={text!r}: must be a whole number"


def test_fraction_in_toml_is_not_a_whole_number(tmp_path: Path) -> None:
    """retry.attempts = 2.5 in TOML is refused, naming the file."""
    assert refused(tmp_path, toml="[retry]\nattempts = 2.5\n").startswith("retry.attempts (tokenguard.toml)=2.5")


@pytest.mark.parametrize("text", ["none", "None", "NULL", "off", ""])
def test_none_for_deadline_and_retry_budget(tmp_path: Path, text: str) -> None:
    """retry.deadline_s and retry.retry_budget take none / null / off / empty for "no limit",
    and the Retry built has none."""
    config = load(tmp_path, TOKENGUARD_RETRY_DEADLINE_S=text, TOKENGUARD_RETRY_RETRY_BUDGET=text)
    assert config["retry.deadline_s"] is None
    assert config["retry.retry_budget"] is None
    retry = config.guard_kwargs()["retry"]
    assert (retry.deadline_s, retry.retry_budget) == (None, None)


def test_none_for_deadline_from_toml(tmp_path: Path) -> None:
    """In TOML, none is the string "none"; a number is a number."""
    config = load(tmp_path, toml='[retry]\ndeadline_s = "none"\nretry_budget = 0.5\n')
    assert (config["retry.deadline_s"], config["retry.retry_budget"]) == (None, 0.5)
    assert refused(tmp_path, toml='[retry]\ndeadline_s = "never"\n').startswith(
        "retry.deadline_s (tokenguard.toml)='never'"
    )


def test_text_keys(tmp_path: Path) -> None:
    """Text keys are stripped; empty text is refused."""
    config = load(tmp_path, TOKENGUARD_LOOPS_MODE=" warn ", TOKENGUARD_CACHE_PATH=str(tmp_path / "c"))
    assert (config["loops.mode"], config["cache.path"]) == ("warn", str(tmp_path / "c"))
    assert "must be a non-empty string" in refused(tmp_path, TOKENGUARD_LOOPS_MODE="  ")
    assert "must be a non-empty string" in refused(tmp_path, toml="store = 3\n")


@pytest.mark.parametrize(
    ("text", "value"), [("memory", "memory"), ("MEMORY", "memory"), ("disk", "disk"), ("true", True), ("no", False)]
)
def test_cache_switch(tmp_path: Path, text: str, value: bool | str) -> None:
    """cache is a boolean or a backend name (memory, disk)."""
    assert load(tmp_path, TOKENGUARD_CACHE=text)["cache"] == value


def test_cache_table_turns_the_cache_on(tmp_path: Path) -> None:
    """A [cache] table turns the cache on (from that file) and sets its keys."""
    config = load(tmp_path, toml=f'[cache]\npath = "{tmp_path / "c"}"\nttl_s = 60\n')
    assert (config["cache"], config.settings["cache"].source) == (True, "tokenguard.toml")
    assert config["cache.ttl_s"] == 60.0


@pytest.mark.parametrize(("enabled", "value"), [("false", False), ('"memory"', "memory"), ("true", True)])
def test_cache_table_enabled(tmp_path: Path, enabled: str, value: bool | str) -> None:
    """enabled = ... in the [cache] table is the switch itself: false keeps the cache off."""
    config = load(tmp_path, toml=f"[cache]\nenabled = {enabled}\nttl_s = 60\n")
    assert config["cache"] == value
    assert config["cache.ttl_s"] == 60.0
    assert ("cache" in config.guard_kwargs()) is (value is not False)


def test_tables_in_pyproject(tmp_path: Path) -> None:
    """[tool.tokenguard.loops] turns the loop detector on, like [loops] in tokenguard.toml;
    enabled = false in [tool.tokenguard.retry] turns retrying off."""
    config = load(
        tmp_path, pyproject="[tool.tokenguard.loops]\nmax_repeats = 2\n[tool.tokenguard.retry]\nenabled = false\n"
    )
    assert (config["loops"], config["loops.max_repeats"], config["retry"]) == (True, 2, False)
    assert config.settings["loops"].source == "pyproject.toml [tool.tokenguard]"


BUDGETS = [
    {"limit_usd": 50, "period": "day", "per": "user", "alerts": [0.5, 0.9]},
    {"limit_usd": "2000", "period": "month", "name": "company"},
    {"limit_tokens": 1_000_000, "period": "hour", "action": "alert"},
]


def test_budgets_from_toml_tables(tmp_path: Path) -> None:
    """[[budgets]] tables are a list of budgets; guard_kwargs makes each a Budget."""
    toml = (
        '[[budgets]]\nlimit_usd = 50\nperiod = "day"\nper = "user"\nalerts = [0.5, 0.9]\n\n'
        '[[budgets]]\nlimit_usd = "2000"\nperiod = "month"\nname = "company"\n\n'
        '[[budgets]]\nlimit_tokens = 1000000\nperiod = "hour"\naction = "alert"\n'
    )
    config = load(tmp_path, toml=toml)
    assert config["budgets"] == BUDGETS
    assert config.settings["budgets"].source == "tokenguard.toml"
    built = config.guard_kwargs()["budgets"]
    assert built == [
        tokenguard.Budget(limit_usd=50, period="day", per="user", alerts=(0.5, 0.9)),
        tokenguard.Budget(limit_usd="2000", period="month", name="company"),
        tokenguard.Budget(limit_tokens=1_000_000, period="hour", action="alert"),
    ]
    assert built[0].usd == Decimal(50)
    assert built[0].describe() == "$50/day per user"


def test_budgets_from_pyproject(tmp_path: Path) -> None:
    """[[tool.tokenguard.budgets]] in pyproject.toml."""
    config = load(tmp_path, pyproject='[[tool.tokenguard.budgets]]\nlimit_usd = 5\nperiod = "week"\n')
    (budget,) = config.guard_kwargs()["budgets"]
    assert (budget.usd, budget.period, budget.per) == (Decimal(5), "week", None)


def test_budgets_from_json_in_the_environment(tmp_path: Path) -> None:
    """TOKENGUARD_BUDGETS holds a JSON list of the same tables, and beats the files."""
    config = load(tmp_path, toml='[[budgets]]\nlimit_usd = 1\nperiod = "day"\n', TOKENGUARD_BUDGETS=json.dumps(BUDGETS))
    assert config["budgets"] == BUDGETS
    assert config.settings["budgets"].source == "env TOKENGUARD_BUDGETS"
    assert [b.period for b in config.guard_kwargs()["budgets"]] == ["day", "month", "hour"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "must be a JSON list"),
        ('{"limit_usd": 5}', "must be a list of tables"),
        ("[5]", "must be a list of tables"),
    ],
)
def test_bad_budgets_json(tmp_path: Path, text: str, reason: str) -> None:
    """Budgets that are not a JSON list of objects: an error naming budgets and the variable."""
    message = refused(tmp_path, TOKENGUARD_BUDGETS=text)
    assert message.startswith("budgets (env TOKENGUARD_BUDGETS)=")
    assert reason in message


def test_bad_budget_value_names_budgets_and_the_file(tmp_path: Path) -> None:
    """A budget the Budget class refuses (a bad period, a bad limit) is named with its file."""
    message = refused(tmp_path, toml='[[budgets]]\nlimit_usd = 1\nperiod = "fortnight"\n')
    assert message.startswith("budgets (tokenguard.toml)='fortnight'")
    assert "budgets (tokenguard.toml)" in refused(tmp_path, toml='[[budgets]]\nlimit_usd = -1\nperiod = "day"\n')
    assert "budgets (tokenguard.toml)" in refused(tmp_path, toml="budgets = 3\n")


def test_budget_table_with_an_unknown_field(tmp_path: Path) -> None:
    """A typo in a budget table is a ConfigurationError naming budgets and the file."""
    assert "budgets (tokenguard.toml)" in refused(tmp_path, toml='[[budgets]]\nlimit = 1\nperiod = "day"\n')


def test_webhook(tmp_path: Path) -> None:
    """[alerts] webhook = URL: an on_alert WebhookAlerts posting to it; a URL that is not http(s)
    is an error naming alerts.webhook."""
    config = load(tmp_path, toml='[alerts]\nwebhook = "https://hooks.example.test/T/B/token"\n')
    on_alert = config.guard_kwargs()["on_alert"]
    assert isinstance(on_alert, tokenguard.WebhookAlerts)
    assert on_alert.url == "https://hooks.example.test/T/B/token"
    assert refused(tmp_path, TOKENGUARD_ALERTS_WEBHOOK="ftp://x").startswith(
        "alerts.webhook (env TOKENGUARD_ALERTS_WEBHOOK)"
    )


# -- guard_kwargs ----------------------------------------------------------------------------------


def test_guard_kwargs_defaults(tmp_path: Path) -> None:
    """The defaults: no store (the default ledger), no cache, the default Retry, no loop
    detector, no budgets, no telemetry, no webhook."""
    kwargs = load(tmp_path).guard_kwargs()
    assert kwargs.keys() == {"store", "require_prices", "retry", "budgets"}
    assert (kwargs["store"], kwargs["require_prices"], kwargs["budgets"]) == (None, False, [])
    retry = kwargs["retry"]
    assert isinstance(retry, tokenguard.Retry)
    default = tokenguard.Retry()
    assert (retry.attempts, retry.initial_delay_s, retry.max_delay_s, retry.deadline_s, retry.retry_budget) == (
        default.attempts,
        default.initial_delay_s,
        default.max_delay_s,
        default.deadline_s,
        default.retry_budget,
    )


def test_guard_kwargs_builds_each_object(tmp_path: Path) -> None:
    """Every setting reaches the object it configures: Cache, Retry, LoopDetector, the store,
    require_prices and otel."""
    toml = f"""
store = "memory://"
require_prices = true
otel = true

[cache]
path = "{tmp_path / "responses"}"
ttl_s = 60
max_size_mb = 8
cache_all = true
share_across_keys = true

[retry]
attempts = 2
initial_delay_s = 0.1
max_delay_s = 1
deadline_s = 5
retry_budget = 0.5

[loops]
max_repeats = 5
window_s = 30
mode = "warn"
cool_down_s = 0
"""
    kwargs = load(tmp_path, toml=toml).guard_kwargs()
    assert (kwargs["store"], kwargs["require_prices"], kwargs["otel"]) == ("memory://", True, True)
    cache = kwargs["cache"]
    assert isinstance(cache, tokenguard.Cache)
    assert (cache.backend_name, cache.path, cache.ttl_s, cache.max_size_mb) == ("disk", tmp_path / "responses", 60, 8)
    assert cache.cache_all is cache.share_across_keys is True
    cache.close()
    retry = kwargs["retry"]
    assert (retry.attempts, retry.initial_delay_s, retry.max_delay_s, retry.deadline_s, retry.retry_budget) == (
        2,
        0.1,
        1,
        5,
        0.5,
    )
    loops = kwargs["loops"]
    assert isinstance(loops, tokenguard.LoopDetector)
    assert (loops.max_repeats, loops.window_s, loops.mode, loops.cool_down_s) == (5, 30, "warn", 0)


def test_guard_kwargs_memory_cache(tmp_path: Path) -> None:
    """cache = "memory": an in-process cache, no directory."""
    cache = load(tmp_path, TOKENGUARD_CACHE="memory").guard_kwargs()["cache"]
    assert (cache.backend_name, cache.path) == ("memory", None)


def test_guard_kwargs_make_a_working_guard(tmp_path: Path) -> None:
    """The keyword arguments are accepted by Guard as they are."""
    config = load(tmp_path, toml='store = "memory://"\nloops = true\n[[budgets]]\nlimit_usd = 1\nperiod = "day"\n')
    guard = tokenguard.Guard(**config.guard_kwargs())
    assert guard.loops is not None
    assert [b.period for b in guard.budgets] == ["day"]
    guard.close()


@pytest.mark.parametrize(
    ("toml", "env", "named"),
    [
        ("[retry]\nattempts = 0\n", {}, "retry.attempts (tokenguard.toml)=0"),
        ("", {"TOKENGUARD_RETRY_ATTEMPTS": "101"}, "retry.attempts (env TOKENGUARD_RETRY_ATTEMPTS)=101"),
        ("[retry]\ninitial_delay_s = -1\n", {}, "retry.initial_delay_s (tokenguard.toml)=-1"),
        ("", {"TOKENGUARD_CACHE": "memory", "TOKENGUARD_CACHE_TTL_S": "0"}, "cache.ttl_s (env TOKENGUARD_CACHE_TTL_S)"),
        ('[loops]\nmode = "Block"\n', {}, "loops.mode (tokenguard.toml)='Block'"),
        ("[loops]\nmax_repeats = 0\n", {}, "loops.max_repeats (tokenguard.toml)=0"),
    ],
)
def test_guard_kwargs_errors_name_the_key_and_its_source(
    tmp_path: Path, toml: str, env: dict[str, str], named: str
) -> None:
    """A value the configured class refuses is named by its own key and where it was set (not
    by the switch that turned the protection on)."""
    assert refused(tmp_path, toml=toml, **env).startswith(named)


def test_bad_value_of_a_protection_that_is_off_is_not_checked(tmp_path: Path) -> None:
    """Settings of a protection that is off are read but not built."""
    kwargs = load(tmp_path, toml="[loops]\nenabled = false\nmax_repeats = 0\n").guard_kwargs()
    assert "loops" not in kwargs


# -- the default guard -----------------------------------------------------------------------------


@pytest.fixture
def in_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory and no TOKENGUARD_* variable (conftest's TOKENGUARD_STORE removed)."""
    monkeypatch.chdir(tmp_path)
    for spec in KEYS.values():
        monkeypatch.delenv(spec.env, raising=False)
    monkeypatch.delenv("TOKENGUARD_CONFIG", raising=False)
    return tmp_path


def test_default_guard_is_built_from_tokenguard_toml(in_project: Path) -> None:
    """default_guard() reads ./tokenguard.toml: its memory store, its loop detector, its
    retry and its budgets."""
    (in_project / "tokenguard.toml").write_text(
        'store = "memory://"\n[loops]\nmax_repeats = 2\n[retry]\nattempts = 3\n'
        '[[budgets]]\nlimit_usd = 10\nperiod = "day"\nper = "user"\n',
        encoding="utf-8",
    )
    guard = tokenguard.default_guard()
    assert guard.store.url == "memory://"
    assert guard.loops is not None
    assert guard.loops.max_repeats == 2
    assert guard.retry is not None
    assert guard.retry.attempts == 3
    assert [b.describe() for b in guard.budgets] == ["$10/day per user"]
    assert tokenguard.default_guard() is guard


def test_default_guard_from_pyproject_and_environment(in_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """[tool.tokenguard] configures the default guard too, and the environment beats it."""
    (in_project / "pyproject.toml").write_text(
        '[tool.tokenguard]\nstore = "sqlite:///never.db"\nloops = true\n', encoding="utf-8"
    )
    monkeypatch.setenv("TOKENGUARD_STORE", "memory://")
    monkeypatch.setenv("TOKENGUARD_RETRY", "off")
    guard = tokenguard.default_guard()
    assert guard.store.url == "memory://"
    assert guard.loops is not None
    assert guard.retry is None
    assert not (in_project / "never.db").exists()


def test_default_guard_refuses_a_bad_configuration(in_project: Path) -> None:
    """A bad value stops the default guard from being built, with the key and file named."""
    (in_project / "tokenguard.toml").write_text('store = "memory://"\n[retry]\nattempts = 0\n', encoding="utf-8")
    with pytest.raises(tokenguard.ConfigurationError, match=r"retry\.attempts \(tokenguard\.toml\)"):
        tokenguard.default_guard()


# -- record_outcome --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "   ", "x" * 129, None, 3])
def test_record_outcome_refuses_a_bad_name(name: Any) -> None:
    """An empty, blank, too long or non-string name: ConfigurationError naming record_outcome.name."""
    guard = tokenguard.Guard(store="memory://")
    for record in (
        lambda: tokenguard.record_outcome(name, guard=guard),
        lambda: tokenguard.record_outcome(name),
        lambda: guard.record_outcome(name),
    ):
        with pytest.raises(tokenguard.ConfigurationError) as caught:
            record()
        assert caught.value.setting == "record_outcome.name"
    assert list(guard.store.outcomes()) == []


@pytest.mark.parametrize("count", [0, -1, True, 1.5, "2"])
def test_record_outcome_refuses_a_bad_count(count: Any) -> None:
    """A count that is not an int >= 1: ConfigurationError naming record_outcome.count."""
    guard = tokenguard.Guard(store="memory://")
    with pytest.raises(tokenguard.ConfigurationError) as caught:
        tokenguard.record_outcome("answer", count, guard=guard)
    assert caught.value.setting == "record_outcome.count"
    assert "record_outcome.count" in str(caught.value)
    with pytest.raises(tokenguard.ConfigurationError, match=r"^record_outcome\.count"):
        tokenguard.record_outcome("answer", count=count)


def test_record_outcome_on_the_default_guard() -> None:
    """Without guard=, record_outcome records on the default guard, under the current scope plus
    the attributes given; the report counts it."""
    with tokenguard.scope(project="support"):
        tokenguard.record_outcome(" ticket_resolved ", 2, user="alice")
    (outcome,) = tokenguard.default_guard().store.outcomes()
    assert (outcome.name, outcome.count, dict(outcome.scope)) == (
        "ticket_resolved",
        2,
        {"project": "support", "user": "alice"},
    )
    report = build_report(tokenguard.default_guard().store, by=["user"])
    assert [(g.key, g.outcome_count) for g in report.groups] == [(("alice",), 2)]
