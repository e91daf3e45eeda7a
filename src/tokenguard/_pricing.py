"""Prices: what a ``Usage`` of a given model costs, in exact ``Decimal`` USD.

Every price comes from genai-prices (or from a price the user registered); there is no
price table here. genai-prices' own calculation costs ~100 µs a call, too much for the
call path, so a model's price is resolved **once** (per model, price context and
minute, since prices carry start dates and times of day) into a ``RateCard``: the
marginal USD price of each usage count, measured by asking genai-prices to price
probe usages. Pricing is linear inside a price tier, so ``cost = sum(rate * count)`` is
exact; every card checks itself against genai-prices on a mixed usage when it is built
and falls back to genai-prices' full calculation if they ever disagree, and any usage at
or above a tier boundary (e.g. >200k input tokens) is priced by genai-prices directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Final

from genai_prices import Usage as GenaiUsage
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import ModelPrice, TieredPrices

from ._errors import ConfigurationError
from ._usage import Usage

__all__ = ["PriceBook", "RateCard", "genai_usage", "register_price"]

_PROBE: Final = 1000
_FIELDS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
)


def genai_usage(usage: Usage) -> GenaiUsage:
    """The genai-prices ``Usage`` for a tokenguard ``Usage`` (same meanings, other names)."""
    kwargs: dict[str, int] = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
    if usage.cache_read_tokens:
        kwargs["cache_read_tokens"] = usage.cache_read_tokens
    if usage.cache_write_tokens:
        kwargs["cache_write_tokens"] = usage.cache_write_tokens
    if usage.cache_write_1h_tokens:
        kwargs["cache_write_1h_tokens"] = usage.cache_write_1h_tokens
    if usage.reasoning_tokens:
        kwargs["output_reasoning_tokens"] = usage.reasoning_tokens
    return GenaiUsage(**kwargs)


@dataclass(frozen=True, slots=True)
class RateCard:
    """The resolved price of one model: USD per token for each usage count.

    ``model_id`` is genai-prices' id for the model (``gpt-4o`` for ``gpt-4o-2024-08-06``),
    or the registered name for a user price.
    """

    model_id: str
    model_price: ModelPrice
    rates: tuple[Decimal, ...]
    tier_start: int | None
    exact_linear: bool
    context_window: int | None = None

    def worst_case(self, input_tokens: int, output_tokens: int) -> Decimal:
        """The most ``input_tokens`` in and ``output_tokens`` out can cost: every input token
        billed at the dearest input rate (a one-hour cache write, where that costs more)."""
        plain = self.cost(Usage(input_tokens=input_tokens, output_tokens=output_tokens))
        as_cache_write = self.cost(
            Usage(
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cache_write_tokens=input_tokens,
                cache_write_1h_tokens=input_tokens,
            )
        )
        return max(plain, as_cache_write)

    def cost(self, usage: Usage) -> Decimal:
        """USD cost of ``usage`` (exact)."""
        if not self.exact_linear or (self.tier_start is not None and usage.input_tokens >= self.tier_start):
            return Decimal(self.model_price.calc_price(genai_usage(usage))["total_price"])
        r = self.rates
        total = r[0] * usage.input_tokens + r[1] * usage.output_tokens
        # the cache and reasoning counts are usually zero: skip their Decimal products
        if usage.cache_read_tokens:
            total += r[2] * usage.cache_read_tokens
        if usage.cache_write_tokens:
            total += r[3] * usage.cache_write_tokens
        if usage.cache_write_1h_tokens:
            total += r[4] * usage.cache_write_1h_tokens
        if usage.reasoning_tokens:
            total += r[5] * usage.reasoning_tokens
        return total

    @classmethod
    def build(cls, model_id: str, price: ModelPrice, context_window: int | None = None) -> RateCard:
        """Measure the per-token rates of ``price`` with genai-prices and check them once."""

        def total(**counts: int) -> Decimal:
            return Decimal(price.calc_price(GenaiUsage(**counts))["total_price"])

        p = _PROBE
        tier_start = _lowest_tier_start(price)
        if tier_start is not None and tier_start <= 3 * p:
            # too low a boundary to probe under; genai-prices prices every call
            return cls(model_id, price, (Decimal(0),) * 6, tier_start, False, context_window)
        r_in = total(input_tokens=p) / p
        r_out = total(output_tokens=p) / p
        with_write = total(input_tokens=p, cache_write_tokens=p)
        rates = (
            r_in,
            r_out,
            total(input_tokens=p, cache_read_tokens=p) / p - r_in,
            with_write / p - r_in,
            (total(input_tokens=p, cache_write_tokens=p, cache_write_1h_tokens=p) - with_write) / p,
            (total(output_tokens=p, output_reasoning_tokens=p) / p) - r_out,
        )
        card = cls(model_id, price, rates, tier_start, True, context_window)
        check = Usage(
            input_tokens=1789,
            output_tokens=613,
            cache_read_tokens=401,
            cache_write_tokens=307,
            cache_write_1h_tokens=101,
            reasoning_tokens=211,
        )
        if card.cost(check) != Decimal(price.calc_price(genai_usage(check))["total_price"]):
            return cls(model_id, price, rates, tier_start, False, context_window)
        return card


def _lowest_tier_start(price: ModelPrice) -> int | None:
    starts = [tier.start for value in vars(price).values() if isinstance(value, TieredPrices) for tier in value.tiers]
    return min(starts) if starts else None


def _decimal(setting: str, value: object) -> Decimal:
    if isinstance(value, bool):
        raise ConfigurationError(setting, value, "must be a USD price per million tokens, not a bool")
    if isinstance(value, float):
        raise ConfigurationError(setting, value, "give prices as str or Decimal, not float, to keep them exact")
    try:
        dec = Decimal(value)  # type: ignore[arg-type]
    except (InvalidOperation, TypeError, ValueError):
        raise ConfigurationError(setting, value, "not a number") from None
    if not dec.is_finite() or dec < 0:
        raise ConfigurationError(setting, value, "must be a finite, non-negative USD price per million tokens")
    return dec


def _custom_price(
    model: str,
    *,
    input_mtok: object,
    output_mtok: object,
    cache_read_mtok: object | None,
    cache_write_mtok: object | None,
) -> ModelPrice:
    if not isinstance(model, str) or not model:
        raise ConfigurationError("model", model, "a model name is required")
    kwargs: dict[str, Decimal | TieredPrices | None] = {
        "input_mtok": _decimal("input_mtok", input_mtok),
        "output_mtok": _decimal("output_mtok", output_mtok),
    }
    if cache_read_mtok is not None:
        kwargs["cache_read_mtok"] = _decimal("cache_read_mtok", cache_read_mtok)
    if cache_write_mtok is not None:
        kwargs["cache_write_mtok"] = _decimal("cache_write_mtok", cache_write_mtok)
    return ModelPrice(**kwargs)


_GLOBAL_CUSTOM: dict[tuple[str | None, str], ModelPrice] = {}
_GLOBAL_LOCK = threading.Lock()
_GLOBAL_VERSION = [0]


def register_price(
    model: str,
    *,
    input_mtok: Decimal | str | int,
    output_mtok: Decimal | str | int,
    cache_read_mtok: Decimal | str | int | None = None,
    cache_write_mtok: Decimal | str | int | None = None,
    vendor: str | None = None,
) -> None:
    """Register the price of a private or self-hosted model for every guard in this process.

    Prices are USD per million tokens, as ``str``/``Decimal``/``int`` (never float).
    ``vendor`` ("openai", "azure", "anthropic") limits the price to one vendor; by
    default it applies to a model of that name from any vendor. A registered price wins
    over genai-prices' price for the same name.
    """
    price = _custom_price(
        model,
        input_mtok=input_mtok,
        output_mtok=output_mtok,
        cache_read_mtok=cache_read_mtok,
        cache_write_mtok=cache_write_mtok,
    )
    with _GLOBAL_LOCK:
        _GLOBAL_CUSTOM[(vendor, model.lower())] = price
        _GLOBAL_VERSION[0] += 1


# the genai-prices provider id for each vendor tokenguard talks to
_PROVIDER_IDS: Final[Mapping[str, str]] = {"openai": "openai", "azure": "azure", "anthropic": "anthropic"}


class PriceBook:
    """Resolves ``(vendor, model, price context)`` to a ``RateCard``, once per minute at most.

    ``clock`` returns Unix seconds (injectable for tests). Thread-safe: a race builds the
    same card twice, never a wrong one.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._custom: dict[tuple[str | None, str], ModelPrice] = {}
        self._cards: dict[tuple[str, str, tuple[tuple[str, str], ...]], tuple[int, int, RateCard | None]] = {}

    def register(
        self,
        model: str,
        *,
        input_mtok: Decimal | str | int,
        output_mtok: Decimal | str | int,
        cache_read_mtok: Decimal | str | int | None = None,
        cache_write_mtok: Decimal | str | int | None = None,
        vendor: str | None = None,
    ) -> None:
        """Register a price for this price book only (see ``register_price``)."""
        self._custom[(vendor, model.lower())] = _custom_price(
            model,
            input_mtok=input_mtok,
            output_mtok=output_mtok,
            cache_read_mtok=cache_read_mtok,
            cache_write_mtok=cache_write_mtok,
        )
        self._cards.clear()

    def card(self, vendor: str, model: str, context: Mapping[str, str] | None = None) -> RateCard | None:
        """The rate card for ``model`` now, or ``None`` when no price is known."""
        ctx = tuple(sorted(context.items())) if context else ()
        key = (vendor, model, ctx)
        minute = int(self._clock() // 60)
        version = _GLOBAL_VERSION[0]
        hit = self._cards.get(key)
        if hit is not None and hit[0] == minute and hit[1] == version:
            return hit[2]
        card = self._resolve(vendor, model, dict(ctx), minute * 60)
        self._cards[key] = (minute, version, card)
        return card

    def cost(self, vendor: str, model: str, usage: Usage, context: Mapping[str, str] | None = None) -> Decimal | None:
        """USD cost of ``usage`` on ``model``, or ``None`` when no price is known."""
        card = self.card(vendor, model, context)
        return None if card is None else card.cost(usage)

    def _resolve(self, vendor: str, model: str, context: dict[str, str], at: float) -> RateCard | None:
        ref = model.lower()
        for table in (self._custom, _GLOBAL_CUSTOM):
            custom = table.get((vendor, ref)) or table.get((None, ref))
            if custom is not None:
                return RateCard.build(model, custom)
        provider_id = _PROVIDER_IDS.get(vendor, vendor)
        try:
            provider, info = get_snapshot().find_provider_model(ref, None, provider_id, None)
        except LookupError:
            return None
        when = datetime.fromtimestamp(at, tz=UTC)
        # as genai-prices does: a model borrowed from another provider (Azure's gpt-4o is
        # OpenAI's) takes no price variants (tier, batch) from the borrowing provider
        own = any(info is m for m in provider.models)
        price = info.get_prices(when, (context or None) if own else None)
        return RateCard.build(info.id, price, info.context_window)
