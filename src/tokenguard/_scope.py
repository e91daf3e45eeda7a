"""Attribution: which user, project, team ... a call belongs to.

Owns the one ``ContextVar`` holding the active scope attributes. Because it is a
``ContextVar``, a scope is isolated per thread and per asyncio task (a task copies the
context it was created in), and scopes nest: an inner scope adds to, and may override,
the attributes of the outer one. Must not know about clients, stores or budgets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextvars import ContextVar, Token
from types import MappingProxyType, TracebackType
from typing import Final

from ._errors import ConfigurationError

__all__ = ["current_scope", "scope"]

_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})
_ACTIVE: ContextVar[Mapping[str, str]] = ContextVar("tokenguard_scope", default=_EMPTY)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_MAX_VALUE_LEN: Final = 512


def current_scope() -> Mapping[str, str]:
    """The scope attributes active in this thread / task (read-only)."""
    return _ACTIVE.get()


def validate_scope(attrs: Mapping[str, object], *, setting: str = "scope") -> dict[str, str]:
    """Check scope attribute names and values; return them as ``str`` values.

    Names are identifiers (they become report columns and ``per=`` keys); values are
    strings or integers, at most 512 characters.
    """
    out: dict[str, str] = {}
    for name, value in attrs.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigurationError(f"{setting}.{name}", value, "attribute names must be identifiers")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ConfigurationError(f"{setting}.{name}", value, "values must be str or int")
        try:
            text = str(value)
        except ValueError:  # an int too large to print
            text = "x" * (_MAX_VALUE_LEN + 1)
        if len(text) > _MAX_VALUE_LEN:
            raise ConfigurationError(f"{setting}.{name}", text[:40] + "...", "values are at most 512 characters")
        out[name] = text
    return out


class scope:
    """Attribute the calls made inside the block: ``with tokenguard.scope(user="alice", project="x"):``.

    Works with ``with`` and ``async with``, nests (inner attributes override outer ones),
    and is isolated per thread and per asyncio task. Scope attributes choose budgets
    (``per=``), key the loop detector and label the ledger rows.
    """

    __slots__ = ("_attrs", "_tokens")

    def __init__(self, **attrs: str | int) -> None:
        self._attrs = validate_scope(attrs)
        self._tokens: list[Token[Mapping[str, str]]] = []

    @property
    def attributes(self) -> Mapping[str, str]:
        """The attributes this scope adds."""
        return MappingProxyType(self._attrs)

    def __enter__(self) -> Mapping[str, str]:
        merged = MappingProxyType({**_ACTIVE.get(), **self._attrs})
        self._tokens.append(_ACTIVE.set(merged))
        return merged

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        _ACTIVE.reset(self._tokens.pop())

    async def __aenter__(self) -> Mapping[str, str]:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._attrs.items())
        return f"tokenguard.scope({inner})"
