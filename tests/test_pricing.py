"""``_pricing``: PriceBook costs equal genai-prices exactly; custom prices, price contexts and the per-minute card."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import genai_prices
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenguard
from tokenguard import ConfigurationError, Usage, _pricing
from tokenguard._pricing import PriceBook, RateCard, genai_usage

# a fixed instant, on a minute boundary, after every price change the tests rely on
# (the gpt-5 flex and Anthropic batch price variants start in October 2026)
T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
T0_S = T0.timestamp()

MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-5"),
    ("openai", "o3"),
    ("openai", "gpt-4.1"),
    ("openai", "text-embedding-3-small"),
    ("openai", "gpt-4o-2024-08-06"),
    ("anthropic", "claude-sonnet-4-5"),
    ("anthropic", "claude-haiku-4-5"),
    ("anthropic", "claude-opus-4-6"),
    ("anthropic", "claude-sonnet-4-6"),
]


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    """Valid usages: cache reads / writes are parts of the input, 1h writes of the writes, reasoning of output."""
    input_tokens = draw(st.one_of(st.integers(0, 400_000), st.integers(199_990, 200_010)))
    cache_read = draw(st.integers(0, input_tokens))
    cache_write = draw(st.integers(0, input_tokens - cache_read))
    cache_write_1h = draw(st.integers(0, cache_write))
    output_tokens = draw(st.integers(0, 200_000))
    reasoning = draw(st.integers(0, output_tokens))
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cache_write_1h_tokens=cache_write_1h,
        reasoning_tokens=reasoning,
    )


def reference(
    vendor: str, model: str, usage: Usage, *, at: datetime = T0, context: dict[str, str] | None = None
) -> Decimal:
    """genai-prices' own price for the call."""
    return genai_prices.calc_price(
        genai_usage(usage), model, provider_id=vendor, genai_request_timestamp=at, price_context=context
    ).total_price


# one book for the property tests (a fixture would be shared across Hypothesis examples anyway)
BOOK = PriceBook(clock=lambda: T0_S)


@pytest.fixture
def book() -> PriceBook:
    """A fresh price book whose clock is frozen at T0."""
    return PriceBook(clock=lambda: T0_S)


@pytest.fixture
def global_prices(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str | None, str], object]:
    """An empty process-wide registration table for this test only."""
    fresh: dict[tuple[str | None, str], object] = {}
    monkeypatch.setattr(_pricing, "_GLOBAL_CUSTOM", fresh)
    return fresh


# --------------------------------------------------------------------------- agreement with genai-prices


@pytest.mark.parametrize(("vendor", "model"), MODELS)
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(usage=usages())
def test_cost_equals_genai_prices(vendor: str, model: str, usage: Usage) -> None:
    """For real models, PriceBook.cost equals genai-prices' calc_price total exactly (Decimal ==), tiers included."""
    assert BOOK.cost(vendor, model, usage) == reference(vendor, model, usage)


@pytest.mark.parametrize(("vendor", "model"), MODELS)
@pytest.mark.parametrize(
    "usage",
    [
        Usage(),
        Usage(1, 0),
        Usage(0, 1),
        Usage(199_999, 10),
        Usage(200_000, 10, 1000, 500, 100, 5),
        Usage(200_001, 10, 1000, 500, 100, 5),
        Usage(400_000, 200_000, 100_000, 100_000, 50_000, 100_000),
    ],
    ids=["zero", "one-in", "one-out", "below-tier", "at-tier", "above-tier", "large"],
)
def test_cost_at_tier_edges_equals_genai_prices(vendor: str, model: str, usage: Usage) -> None:
    """The exact tier boundary (200k input) and its neighbours are priced like genai-prices."""
    assert BOOK.cost(vendor, model, usage) == reference(vendor, model, usage)


def test_cost_is_decimal_and_known_value(book: PriceBook) -> None:
    """gpt-4o: 1M input + 1M output tokens cost $2.50 + $10 exactly, as a Decimal."""
    cost = book.cost("openai", "gpt-4o", Usage(1_000_000, 1_000_000))
    assert isinstance(cost, Decimal)
    assert cost == Decimal("12.5")


def test_cost_without_clock_matches_genai_prices_now() -> None:
    """With the real clock, the cost matches genai-prices for a call made now."""
    usage = Usage(12_345, 678, 1000, 0, 0, 100)
    assert PriceBook().cost("openai", "gpt-4o", usage) == reference("openai", "gpt-4o", usage, at=datetime.now(UTC))


def test_dated_snapshot_resolves_to_base_model(book: PriceBook) -> None:
    """A dated model name resolves to genai-prices' base model id."""
    card = book.card("openai", "gpt-4o-2024-08-06")
    assert card is not None
    assert card.model_id == "gpt-4o"


def test_price_changes_by_date_follow_the_clock() -> None:
    """o3's price cut (2025-06-10) applies according to the book's clock."""
    before = datetime(2025, 6, 1, tzinfo=UTC)
    usage = Usage(1_000_000, 1_000_000)
    old = PriceBook(clock=lambda: before.timestamp()).cost("openai", "o3", usage)
    new = PriceBook(clock=lambda: T0_S).cost("openai", "o3", usage)
    assert old == reference("openai", "o3", usage, at=before) == Decimal(50)
    assert new == reference("openai", "o3", usage) == Decimal(10)


@pytest.mark.parametrize(
    ("vendor", "model"),
    [("openai", "no-such-model-xyz"), ("anthropic", "claude-nonexistent-9"), ("no-such-vendor", "gpt-4o")],
)
def test_unknown_model_costs_none(book: PriceBook, vendor: str, model: str) -> None:
    """A model (or vendor) genai-prices does not know has no card and no cost."""
    assert book.card(vendor, model) is None
    assert book.cost(vendor, model, Usage(10, 10)) is None


# --------------------------------------------------------------------------- price contexts


def test_flex_service_tier_is_half_price_for_gpt5(book: PriceBook) -> None:
    """gpt-5 with {"service_tier": "flex"} costs half the default, and matches genai-prices."""
    usage = Usage(100_000, 20_000, 40_000, 0, 0, 5_000)
    default = book.cost("openai", "gpt-5", usage)
    flex = book.cost("openai", "gpt-5", usage, {"service_tier": "flex"})
    assert default is not None
    assert flex == default / 2
    assert flex == reference("openai", "gpt-5", usage, context={"service_tier": "flex"})
    assert book.cost("openai", "gpt-5", usage, {"service_tier": "default"}) == default


def test_batch_processing_is_half_price_for_claude(book: PriceBook) -> None:
    """claude-sonnet-4-5 with {"processing": "batch"} costs half the default, and matches genai-prices."""
    usage = Usage(50_000, 4_000, 10_000, 8_000, 2_000, 0)
    default = book.cost("anthropic", "claude-sonnet-4-5", usage)
    batch = book.cost("anthropic", "claude-sonnet-4-5", usage, {"processing": "batch"})
    assert default is not None
    assert batch == default / 2
    assert batch == reference("anthropic", "claude-sonnet-4-5", usage, context={"processing": "batch"})


@pytest.mark.parametrize(
    ("vendor", "model", "context"),
    [
        ("openai", "gpt-5", {"service_tier": "flex"}),
        ("openai", "gpt-4o", {"service_tier": "priority"}),
        ("openai", "o3", {"processing": "batch"}),
        ("anthropic", "claude-sonnet-4-5", {"processing": "batch"}),
        ("anthropic", "claude-opus-4-6", {"processing": "batch"}),
    ],
)
@settings(max_examples=25, deadline=None, database=None)
@given(usage=usages())
def test_cost_with_context_equals_genai_prices(vendor: str, model: str, context: dict[str, str], usage: Usage) -> None:
    """With a price context, PriceBook.cost equals genai-prices with the same context, tiers included."""
    assert BOOK.cost(vendor, model, usage, context) == reference(vendor, model, usage, context=context)


@pytest.mark.parametrize("context", [{"processing": "batch"}, {"service_tier": "priority"}])
def test_azure_with_context_equals_genai_prices(book: PriceBook, context: dict[str, str]) -> None:
    """Azure (priced by genai-prices from OpenAI's models) with a price context costs what genai-prices says."""
    usage = Usage(100_000, 10_000)
    assert book.cost("azure", "gpt-4o", usage, context) == reference("azure", "gpt-4o", usage, context=context)


def test_context_order_does_not_matter(book: PriceBook) -> None:
    """The same context given in another key order is the same card."""
    a = book.card("openai", "gpt-5", {"service_tier": "flex", "processing": "x"})
    b = book.card("openai", "gpt-5", {"processing": "x", "service_tier": "flex"})
    assert a is b


# --------------------------------------------------------------------------- registered prices


def test_book_register_prices_a_private_model(book: PriceBook) -> None:
    """A price registered on a book prices that model per million tokens, exactly."""
    book.register("my-llama", input_mtok="0.2", output_mtok=Decimal("0.6"))
    assert book.cost("openai", "my-llama", Usage(1_000_000, 500_000)) == Decimal("0.5")
    assert book.cost("openai", "my-llama", Usage(3, 7)) == Decimal("0.0000048")


def test_book_register_accepts_int_prices_and_cache_prices(book: PriceBook) -> None:
    """int prices are accepted; cache read / write prices apply to those parts of the input."""
    book.register("m", input_mtok=2, output_mtok=8, cache_read_mtok="0.5", cache_write_mtok="2.5")
    usage = Usage(input_tokens=1_000_000, output_tokens=0, cache_read_tokens=400_000, cache_write_tokens=100_000)
    # 500k uncached * $2 + 400k read * $0.5 + 100k written * $2.5
    assert book.cost("anthropic", "m", usage) == Decimal("1") + Decimal("0.2") + Decimal("0.25")


def test_model_names_are_case_insensitive(book: PriceBook) -> None:
    """A registered price applies whatever the case of the model name."""
    book.register("My-Model", input_mtok="1", output_mtok="1")
    assert book.cost("openai", "MY-MODEL", Usage(1_000_000, 0)) == Decimal(1)
    assert book.cost("openai", "my-model", Usage(1_000_000, 0)) == Decimal(1)


def test_registered_price_wins_over_genai_prices(book: PriceBook) -> None:
    """A price registered for a name genai-prices knows replaces genai-prices' price."""
    usage = Usage(1_000_000, 1_000_000)
    assert book.cost("openai", "gpt-4o", usage) == Decimal("12.5")
    book.register("gpt-4o", input_mtok="1", output_mtok="2")
    assert book.cost("openai", "gpt-4o", usage) == Decimal(3)


def test_vendor_limited_registration_applies_to_that_vendor_only(book: PriceBook) -> None:
    """A price registered with vendor= applies to that vendor; other vendors keep genai-prices' price."""
    usage = Usage(1_000_000, 1_000_000)
    book.register("gpt-4o", input_mtok="1", output_mtok="2", vendor="azure")
    assert book.cost("azure", "gpt-4o", usage) == Decimal(3)
    assert book.cost("openai", "gpt-4o", usage) == Decimal("12.5")
    book.register("private-x", input_mtok="1", output_mtok="1", vendor="anthropic")
    assert book.cost("anthropic", "private-x", usage) == Decimal(2)
    assert book.cost("openai", "private-x", usage) is None


def test_vendor_specific_price_beats_any_vendor_price(book: PriceBook) -> None:
    """When both a vendor-specific and an any-vendor price exist, the vendor-specific one is used for that vendor."""
    usage = Usage(1_000_000, 0)
    book.register("m", input_mtok="1", output_mtok="1")
    book.register("m", input_mtok="5", output_mtok="1", vendor="openai")
    assert book.cost("openai", "m", usage) == Decimal(5)
    assert book.cost("anthropic", "m", usage) == Decimal(1)


def test_book_register_invalidates_cached_cards(book: PriceBook) -> None:
    """Registering on a book takes effect immediately, even for a model whose card was cached."""
    assert book.cost("openai", "late-model", Usage(1, 1)) is None
    book.register("late-model", input_mtok="1", output_mtok="1")
    assert book.cost("openai", "late-model", Usage(1_000_000, 0)) == Decimal(1)


def test_book_registration_is_private_to_the_book(book: PriceBook) -> None:
    """A price registered on one book is not seen by another book."""
    book.register("only-here", input_mtok="1", output_mtok="1")
    assert PriceBook(clock=lambda: T0_S).cost("openai", "only-here", Usage(1, 1)) is None


def test_global_register_price(global_prices: dict[object, object], book: PriceBook) -> None:
    """tokenguard.register_price prices a model for every book, immediately, even one that cached it as unknown."""
    assert book.cost("openai", "global-model", Usage(1, 1)) is None
    tokenguard.register_price("global-model", input_mtok="3", output_mtok="4")
    assert book.cost("openai", "global-model", Usage(1_000_000, 1_000_000)) == Decimal(7)
    assert PriceBook().cost("anthropic", "GLOBAL-MODEL", Usage(0, 1_000_000)) == Decimal(4)
    assert list(global_prices) == [(None, "global-model")]


def test_global_registration_wins_over_genai_prices(global_prices: dict[object, object], book: PriceBook) -> None:
    """A globally registered price replaces genai-prices' price for that name."""
    usage = Usage(1_000_000, 1_000_000)
    assert book.cost("anthropic", "claude-haiku-4-5", usage) == Decimal(6)
    tokenguard.register_price("claude-haiku-4-5", input_mtok="0", output_mtok="1", vendor="anthropic")
    assert book.cost("anthropic", "claude-haiku-4-5", usage) == Decimal(1)


def test_global_vendor_limited_registration(global_prices: dict[object, object], book: PriceBook) -> None:
    """A global price with vendor= applies only to that vendor."""
    tokenguard.register_price("gpt-4o", input_mtok="1", output_mtok="1", vendor="azure")
    usage = Usage(1_000_000, 0)
    assert book.cost("azure", "gpt-4o", usage) == Decimal(1)
    assert book.cost("openai", "gpt-4o", usage) == Decimal("2.5")


def test_book_price_beats_global_price(global_prices: dict[object, object], book: PriceBook) -> None:
    """A book's own registration wins over a process-wide one for the same model."""
    tokenguard.register_price("m", input_mtok="1", output_mtok="1")
    book.register("m", input_mtok="9", output_mtok="1")
    assert book.cost("openai", "m", Usage(1_000_000, 0)) == Decimal(9)


REGISTER_FUNCS = ["book", "global"]


def _register(kind: str, book: PriceBook, **kwargs: object) -> None:
    if kind == "book":
        book.register("m", **kwargs)  # type: ignore[arg-type]
    else:
        tokenguard.register_price("m", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", REGISTER_FUNCS)
@pytest.mark.parametrize("setting", ["input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok"])
@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (1.5, "float"),
        (0.0, "float"),
        ("-1", "non-negative"),
        (-2, "non-negative"),
        (Decimal("-0.01"), "non-negative"),
        ("NaN", "finite"),
        ("Infinity", "finite"),
        ("abc", "not a number"),
        (None, None),
    ],
    ids=["float", "float-zero", "neg-str", "neg-int", "neg-decimal", "nan", "inf", "junk", "None"],
)
def test_bad_prices_are_rejected_naming_the_setting(
    global_prices: dict[object, object], book: PriceBook, kind: str, setting: str, bad: object, why: str | None
) -> None:
    """A float, negative, non-finite or non-numeric price raises ConfigurationError naming the setting."""
    prices: dict[str, object] = {"input_mtok": "1", "output_mtok": "1", setting: bad}
    if bad is None and setting.startswith("cache"):
        _register(kind, book, **prices)  # None means "no cache price", which is fine
        return
    with pytest.raises(ConfigurationError) as info:
        _register(kind, book, **prices)
    assert info.value.setting == setting
    assert setting in str(info.value)
    if why is not None:
        assert why in str(info.value)
    assert global_prices == {}
    assert book.cost("openai", "m", Usage(1, 1)) is None


@pytest.mark.parametrize("kind", REGISTER_FUNCS)
@pytest.mark.parametrize("model", ["", None, 5])
def test_model_name_is_required(global_prices: dict[object, object], book: PriceBook, kind: str, model: object) -> None:
    """Registering without a model name string raises ConfigurationError naming "model"."""
    register = book.register if kind == "book" else tokenguard.register_price
    with pytest.raises(ConfigurationError) as info:
        register(model, input_mtok="1", output_mtok="1")  # type: ignore[arg-type]
    assert info.value.setting == "model"


def test_zero_prices_are_allowed(book: PriceBook) -> None:
    """A free model (all prices 0) is priced at exactly 0, not unpriced."""
    book.register("free", input_mtok=0, output_mtok="0")
    assert book.cost("openai", "free", Usage(1000, 1000)) == Decimal(0)


@settings(max_examples=50, deadline=None, database=None)
@given(
    usage=usages(),
    prices=st.tuples(*[st.decimals(min_value=0, max_value=100, places=4) for _ in range(4)]),
)
def test_custom_price_cost_equals_genai_prices(usage: Usage, prices: tuple[Decimal, ...]) -> None:
    """A registered price costs exactly what genai-prices computes for the same ModelPrice."""
    book = PriceBook(clock=lambda: T0_S)
    book.register(
        "m", input_mtok=prices[0], output_mtok=prices[1], cache_read_mtok=prices[2], cache_write_mtok=prices[3]
    )
    card = book.card("openai", "m")
    assert card is not None
    expected = card.model_price.calc_price(genai_usage(usage))["total_price"]
    assert book.cost("openai", "m", usage) == expected


# --------------------------------------------------------------------------- resolving once per minute


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The model ids RateCard.build is called for, in order."""
    calls: list[str] = []
    original = RateCard.build

    def counting(cls: type[RateCard], model_id: str, *args: Any, **kwargs: Any) -> RateCard:
        calls.append(model_id)
        return original(model_id, *args, **kwargs)

    monkeypatch.setattr(RateCard, "build", classmethod(counting))
    return calls


def test_card_is_built_once_per_minute(builds: list[str]) -> None:
    """Within one minute a model's card is built once; 61 s later it is rebuilt."""
    clock = _Clock(T0_S)
    book = PriceBook(clock=clock)
    usage = Usage(1000, 100)
    first = book.cost("openai", "gpt-4o", usage)
    for step in (0, 1, 30, 59):
        clock.now = T0_S + step
        assert book.cost("openai", "gpt-4o", usage) == first
    assert builds == ["gpt-4o"]

    clock.now = T0_S + 61
    assert book.cost("openai", "gpt-4o", usage) == first
    assert builds == ["gpt-4o", "gpt-4o"]
    assert book.cost("openai", "gpt-4o", usage) == first
    assert builds == ["gpt-4o", "gpt-4o"]


def test_each_model_and_context_has_its_own_card(builds: list[str]) -> None:
    """Different models and different price contexts are built separately, once each per minute."""
    book = PriceBook(clock=_Clock(T0_S))
    for _ in range(3):
        book.cost("openai", "gpt-5", Usage(1, 1))
        book.cost("openai", "gpt-5", Usage(1, 1), {"service_tier": "flex"})
        book.cost("anthropic", "claude-haiku-4-5", Usage(1, 1))
    assert builds == ["gpt-5", "gpt-5", "claude-haiku-4-5"]


def test_unknown_model_is_remembered_for_the_minute(builds: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown model is looked up once per minute, not on every call."""
    lookups: list[str] = []
    snapshot = _pricing.get_snapshot()
    original = type(snapshot).find_provider_model

    def counting(self: object, ref: str, *args: object) -> object:
        lookups.append(ref)
        return original(self, ref, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(type(snapshot), "find_provider_model", counting)
    clock = _Clock(T0_S)
    book = PriceBook(clock=clock)
    for _ in range(3):
        assert book.cost("openai", "nope-model", Usage(1, 1)) is None
    assert lookups == ["nope-model"]
    clock.now += 61
    assert book.cost("openai", "nope-model", Usage(1, 1)) is None
    assert lookups == ["nope-model", "nope-model"]
    assert builds == []


def test_price_is_resolved_at_the_clock_time(builds: list[str]) -> None:
    """Advancing the clock across a price change date changes the price on the next rebuild."""
    before = datetime(2025, 6, 9, 23, 59, tzinfo=UTC).timestamp()
    clock = _Clock(before)
    book = PriceBook(clock=clock)
    usage = Usage(1_000_000, 0)
    assert book.cost("openai", "o3", usage) == Decimal(10)
    clock.now = before + 61  # 2025-06-10 00:00:01, the day o3's price was cut
    assert book.cost("openai", "o3", usage) == Decimal(2)
    assert builds == ["o3", "o3"]
