"""``tokenguard.Usage``: validation, addition and totals."""

from __future__ import annotations

import dataclasses

import pytest

from tokenguard import Usage

FIELDS = [f.name for f in dataclasses.fields(Usage)]


def test_fields_default_to_zero() -> None:
    """A bare Usage() has every count at zero and a zero total."""
    u = Usage()
    assert all(getattr(u, name) == 0 for name in FIELDS)
    assert u.total_tokens == 0


def test_fields_are_the_six_counts() -> None:
    """Usage has exactly the six documented counts, in order (positional construction relies on it)."""
    assert FIELDS == [
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "cache_write_1h_tokens",
        "reasoning_tokens",
    ]


def test_add_is_fieldwise() -> None:
    """``a + b`` adds every count separately."""
    a = Usage(100, 20, 30, 40, 5, 6)
    b = Usage(1, 2, 3, 4, 5, 6)
    assert a + b == Usage(101, 22, 33, 44, 10, 12)


def test_add_does_not_mutate() -> None:
    """Addition returns a new Usage and leaves both operands unchanged."""
    a, b = Usage(1, 1), Usage(2, 2)
    c = a + b
    assert (a, b, c) == (Usage(1, 1), Usage(2, 2), Usage(3, 3))
    assert c is not a
    assert c is not b


def test_sum_of_usages() -> None:
    """sum() over usages (starting from the default 0) adds them all up."""
    usages = [Usage(i, 2 * i, i // 2, i // 3, i // 4, i // 5) for i in range(1, 11)]
    total = sum(usages)
    assert total == Usage(55, 110, 25, 15, 10, 7)


def test_sum_with_usage_start() -> None:
    """sum(..., Usage()) also works, and an empty sum with that start is a zero Usage."""
    assert sum([Usage(1, 2), Usage(3, 4)], Usage()) == Usage(4, 6)
    assert sum([], Usage()) == Usage()


def test_zero_plus_usage_is_the_usage() -> None:
    """0 + u is u (what sum() does first)."""
    u = Usage(3, 4)
    assert 0 + u == u


@pytest.mark.parametrize("other", [1, 1.5, "x", None, (1, 2)])
def test_add_with_non_usage_is_a_type_error(other: object) -> None:
    """Adding anything but a Usage (or the 0 sum() starts with) raises TypeError, either side."""
    with pytest.raises(TypeError):
        Usage(1, 1) + other  # type: ignore[operator]
    with pytest.raises(TypeError):
        other + Usage(1, 1)  # type: ignore[operator]


def test_total_tokens_is_input_plus_output() -> None:
    """total_tokens is input + output; cache and reasoning counts are parts of those, not added again."""
    u = Usage(
        input_tokens=1000,
        output_tokens=300,
        cache_read_tokens=400,
        cache_write_tokens=200,
        cache_write_1h_tokens=100,
        reasoning_tokens=250,
    )
    assert u.total_tokens == 1300


def test_usage_is_frozen_and_hashable() -> None:
    """A Usage cannot be changed after creation and can be used as a dict key."""
    u = Usage(1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        u.input_tokens = 5  # type: ignore[misc]
    assert {u: "x"}[Usage(1, 2)] == "x"


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize(
    "bad",
    [-1, True, False, 1.0, 0.5, "3", None],
    ids=["negative", "True", "False", "float-1.0", "float-0.5", "str", "None"],
)
def test_bad_values_are_rejected_naming_the_field(field: str, bad: object) -> None:
    """A negative, bool, float or other non-int count raises ValueError naming that field."""
    with pytest.raises(ValueError, match=rf"Usage\.{field}\b") as info:
        Usage(**{field: bad})  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)


def test_large_counts_are_fine() -> None:
    """Counts far beyond any real call are accepted and added exactly."""
    big = Usage(10**15, 10**15)
    assert (big + big).total_tokens == 4 * 10**15
