"""Configuration of the default guard — the one an import-only user gets — in one place.

Sources, the first that sets a key wins:

1. environment variables (``TOKENGUARD_STORE``, ``TOKENGUARD_CACHE``, ``TOKENGUARD_RETRY_ATTEMPTS`` ...);
2. ``tokenguard.toml`` (the file ``TOKENGUARD_CONFIG`` names, else ``./tokenguard.toml``);
3. ``[tool.tokenguard]`` in ``./pyproject.toml``;
4. the defaults.

``tokenguard config`` prints every key, its effective value and where it came from. A bad
value is a ``ConfigurationError`` naming the key and the place it was set.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ._budget import Budget, WebhookAlerts
from ._cache import Cache
from ._errors import ConfigurationError
from ._loops import LoopDetector
from ._retry import Retry

__all__ = ["KEYS", "Config", "Setting", "load_config"]

_TRUE: Final = {"1", "true", "yes", "on"}
_FALSE: Final = {"0", "false", "no", "off", ""}


def _bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    if isinstance(text, str) and text.strip().lower() in _TRUE | _FALSE:
        return text.strip().lower() in _TRUE
    raise ValueError("must be true or false")


def _number(text: Any) -> float:
    if isinstance(text, bool):
        raise ValueError("must be a number")
    try:
        value = float(text) if isinstance(text, str | int | float) else math.nan
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(value):
        raise ValueError("must be a number")
    return value


def _optional_number(text: Any) -> float | None:
    if isinstance(text, str) and text.strip().lower() in ("none", "null", "off", ""):
        return None
    return _number(text)


def _int(text: Any) -> int:
    if isinstance(text, bool):
        raise ValueError("must be a whole number")
    try:
        value = float(text) if isinstance(text, str) else text
        if not isinstance(value, int | float) or not float(value).is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError("must be a whole number") from None


def _text(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("must be a non-empty string")
    return text.strip()


def _cache_switch(text: Any) -> bool | str:
    """``cache``: true/false, a backend name, or a Redis URL."""
    if isinstance(text, str) and text.strip().lower() in ("memory", "disk"):
        return text.strip().lower()
    if isinstance(text, str) and text.strip().startswith(("redis://", "rediss://", "unix://")):
        return text.strip()
    try:
        return _bool(text)
    except ValueError:
        raise ValueError("must be true, false, memory, disk or a redis:// URL") from None


def _budgets(value: Any) -> list[dict[str, Any]]:
    """``budgets``: a list of tables (TOML) or a JSON list (environment)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError('must be a JSON list, e.g. [{"limit_usd": 50, "period": "day", "per": "user"}]') from None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ValueError("must be a list of tables, each with limit_usd (or limit_tokens), period, per ...")
    return value


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key: how to read it, its environment variable, its default."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str

    @property
    def env(self) -> str:
        return "TOKENGUARD_" + self.name.upper().replace(".", "_")


KEYS: Final = {
    k.name: k
    for k in (
        Key("store", _text, None, "ledger store URL (sqlite:///..., memory://); default: the user data dir"),
        Key("require_prices", _bool, False, "refuse calls to models with no known price"),
        Key("cache", _cache_switch, False, "response cache: true (disk), memory, disk, a redis:// URL, or false"),
        Key("cache.path", _text, None, "disk cache directory; default: the user cache dir"),
        Key("cache.ttl_s", _number, 86_400.0, "seconds an answer is served from the cache"),
        Key("cache.max_size_mb", _number, 512.0, "the cache's size bound"),
        Key("cache.cache_all", _bool, False, "cache requests that do not ask for a repeatable answer too"),
        Key("cache.share_across_keys", _bool, False, "serve answers across API keys"),
        Key("retry", _bool, True, "bounded retry (the SDKs' own retries are always off)"),
        Key("retry.attempts", _int, 4, "attempts per call, the first included"),
        Key("retry.initial_delay_s", _number, 0.5, "the first backoff"),
        Key("retry.max_delay_s", _number, 30.0, "the longest single sleep"),
        Key("retry.deadline_s", _optional_number, 120.0, "a call's total wall time (none: no deadline)"),
        Key("retry.retry_budget", _optional_number, 0.2, "retries as a fraction of recent calls (none: no limit)"),
        Key("loops", _bool, False, "the loop detector"),
        Key("loops.max_repeats", _int, 3, "times the same request may be sent in the window"),
        Key("loops.window_s", _number, 600.0, "the loop detector's window"),
        Key("loops.mode", _text, "block", "block or warn"),
        Key("loops.cool_down_s", _number, 60.0, "refuse a loop's continuation this long after a block"),
        Key("budgets", _budgets, [], "caps: a list of {limit_usd, period, per, alerts, limit_tokens, name, action}"),
        Key("alerts.webhook", _text, None, "POST budget alerts as JSON to this URL (Slack-compatible)"),
        Key("otel", _bool, False, "OpenTelemetry spans and metrics (needs the otel extra)"),
    )
}


@dataclass(frozen=True, slots=True)
class Setting:
    """A key's effective value and where it came from."""

    key: str
    value: Any
    source: str  # "env TOKENGUARD_...", "tokenguard.toml", "pyproject.toml [tool.tokenguard]", "default"


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and key != "budgets":
            # a table is the switch's settings: [cache] path = ... means cache is on, unless it says
            nested = _flatten(value, key + ".")
            if key in KEYS and key not in nested and "enabled" not in value:
                out[key] = True
            if "enabled" in value:
                out[key] = nested.pop(f"{key}.enabled")
            out.update(nested)
        else:
            out[key] = value
    return out


def _read_toml(path: Path, table: str | None) -> dict[str, Any]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigurationError(str(path), "", f"cannot be read: {err}") from None
    if table is not None:
        doc = doc.get("tool", {}).get(table, {})
        if not isinstance(doc, dict):
            raise ConfigurationError(f"{path} [tool.{table}]", doc, "must be a table")
    return _flatten(doc)


def _budget(table: dict[str, Any]) -> Budget:
    try:
        return Budget(**table)
    except TypeError:
        known = "limit_usd, limit_tokens, period, per, alerts, action, name"
        unknown = sorted(set(table) - set(known.split(", ")))
        raise ConfigurationError(
            "Budget", ", ".join(unknown) or table, f"unknown field; a budget takes {known}"
        ) from None


class Config:
    """The effective configuration: every key with its value and source."""

    def __init__(self, settings: Mapping[str, Setting]) -> None:
        self.settings = dict(settings)

    def __getitem__(self, key: str) -> Any:
        return self.settings[key].value

    def _build(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, its ConfigurationError renamed after the configuration key (and its
        source) that holds the bad value: ``Retry.attempts`` -> ``retry.attempts (tokenguard.toml)``."""
        try:
            return make()
        except ConfigurationError as err:
            field = f"{key}.{err.setting.rsplit('.', 1)[-1]}"
            named = field if field in self.settings else key
            where = self.settings[named].source
            raise ConfigurationError(f"{named} ({where})", err.value, err.reason) from None

    def guard_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``tokenguard.Guard`` built from this configuration."""
        kwargs: dict[str, Any] = {"store": self["store"], "require_prices": self["require_prices"]}
        cache = self["cache"]
        if cache:
            backend = cache if isinstance(cache, str) else "disk"
            kwargs["cache"] = self._build(
                "cache",
                lambda: Cache(
                    backend,
                    path=self["cache.path"],
                    ttl_s=self["cache.ttl_s"],
                    max_size_mb=self["cache.max_size_mb"],
                    cache_all=self["cache.cache_all"],
                    share_across_keys=self["cache.share_across_keys"],
                ),
            )
        kwargs["retry"] = (
            self._build(
                "retry",
                lambda: Retry(
                    attempts=self["retry.attempts"],
                    initial_delay_s=self["retry.initial_delay_s"],
                    max_delay_s=self["retry.max_delay_s"],
                    deadline_s=self["retry.deadline_s"],
                    retry_budget=self["retry.retry_budget"],
                ),
            )
            if self["retry"]
            else False
        )
        if self["loops"]:
            kwargs["loops"] = self._build(
                "loops",
                lambda: LoopDetector(
                    max_repeats=self["loops.max_repeats"],
                    window_s=self["loops.window_s"],
                    mode=self["loops.mode"],
                    cool_down_s=self["loops.cool_down_s"],
                ),
            )
        kwargs["budgets"] = [self._build("budgets", functools.partial(_budget, b)) for b in self["budgets"]]
        if self["otel"]:
            kwargs["otel"] = True
        if self["alerts.webhook"]:
            kwargs["on_alert"] = self._build("alerts.webhook", lambda: WebhookAlerts(self["alerts.webhook"]))
        return kwargs


def load_config(cwd: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the configuration (see the module docstring for the order of the sources)."""
    env = os.environ if environ is None else environ
    here = Path.cwd() if cwd is None else cwd
    layers: list[tuple[str, dict[str, Any]]] = []
    named = env.get("TOKENGUARD_CONFIG")
    toml_path = Path(named).expanduser() if named else here / "tokenguard.toml"
    if named and not toml_path.is_file():
        raise ConfigurationError("TOKENGUARD_CONFIG", named, "names no readable file")
    if toml_path.is_file():
        layers.append((str(toml_path.name if not named else toml_path), _read_toml(toml_path, None)))
    pyproject = here / "pyproject.toml"
    if pyproject.is_file():
        layers.append(("pyproject.toml [tool.tokenguard]", _read_toml(pyproject, "tokenguard")))
    for source, values in layers:
        for key in values:
            if key not in KEYS:
                known = ", ".join(KEYS)
                raise ConfigurationError(
                    f"{key} ({source})", values[key], f"is not a tokenguard setting; known: {known}"
                )
    settings: dict[str, Setting] = {}
    for spec in KEYS.values():
        raw: Any = None
        source = "default"
        if spec.env in env:
            raw, source = env[spec.env], f"env {spec.env}"
        else:
            for layer_source, values in layers:
                if spec.name in values:
                    raw, source = values[spec.name], layer_source
                    break
        if source == "default":
            settings[spec.name] = Setting(spec.name, spec.default, source)
            continue
        try:
            value = spec.parse(raw)
        except ValueError as err:
            raise ConfigurationError(f"{spec.name} ({source})", raw, str(err)) from None
        settings[spec.name] = Setting(spec.name, value, source)
    return Config(settings)
