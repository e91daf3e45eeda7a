"""The vendor SDKs that are loaded.

tokenguard imports neither SDK until a client of it is needed, so a program that uses one
never pays for importing the other (a second or more on a slow machine). An object of an
SDK's class can only exist once that SDK is imported, so a check against the loaded SDKs'
classes misses nothing. Owns no state but a cache of class tuples.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType

__all__ = ["classes"]

_NAMES = ("openai", "anthropic")


def classes(*names: str) -> tuple[type, ...]:
    """The classes called ``names`` in every loaded SDK (for ``isinstance``); a name an SDK
    lacks is skipped."""
    modules = sys.modules
    return _classes(names, modules.get("openai"), modules.get("anthropic"))


@functools.cache
def _classes(names: tuple[str, ...], *sdks: ModuleType | None) -> tuple[type, ...]:
    found = (getattr(sdk, name, None) for sdk in sdks if sdk is not None for name in names)
    return tuple(cls for cls in found if isinstance(cls, type))
