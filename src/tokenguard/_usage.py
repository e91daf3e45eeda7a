"""The vendor-neutral token usage of one call.

Owns the meaning of each count, which follows genai-prices (so a ``Usage`` prices
without translation): ``input_tokens`` is the *whole* input, cached and cache-written
tokens included; ``cache_read_tokens`` and ``cache_write_tokens`` are parts of it;
``cache_write_1h_tokens`` is the part of the cache writes kept for one hour;
``reasoning_tokens`` is the part of ``output_tokens`` spent reasoning. Adapters translate
each vendor's fields into this shape; nothing here knows a vendor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["Usage"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call (or, added up with ``+`` / ``sum()``, of many)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        # on the call path: one cheap pass, the slow lookup only to name a bad field
        for value in self.counts():
            if type(value) is not int or value < 0:
                for field in dataclasses.fields(self):
                    bad = getattr(self, field.name)
                    if type(bad) is not int or bad < 0:
                        raise ValueError(f"Usage.{field.name} must be a non-negative int, got {bad!r}")

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            self.cache_write_1h_tokens + other.cache_write_1h_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
        )

    def __radd__(self, other: object) -> Usage:
        # lets sum() start from its default 0
        if type(other) is int and other == 0:
            return self
        return NotImplemented

    def counts(self) -> tuple[int, int, int, int, int, int]:
        """The six counts in field order (``Usage(*usage.counts()) == usage``), as stores keep them."""
        return (
            self.input_tokens,
            self.output_tokens,
            self.cache_read_tokens,
            self.cache_write_tokens,
            self.cache_write_1h_tokens,
            self.reasoning_tokens,
        )

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens
