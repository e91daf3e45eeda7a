"""``tokenguard.scope`` / ``current_scope``: nesting, restoring, isolation and validation."""

from __future__ import annotations

import asyncio
import threading

import pytest

import tokenguard
from tokenguard import ConfigurationError, current_scope, scope


def test_no_scope_is_empty() -> None:
    """Outside any scope, current_scope() is an empty mapping."""
    assert dict(current_scope()) == {}


def test_scope_sets_attributes_and_restores_on_exit() -> None:
    """Inside a scope its attributes are current; after the block the previous scope is back."""
    with scope(user="alice", project="x") as active:
        assert dict(current_scope()) == {"user": "alice", "project": "x"}
        assert dict(active) == {"user": "alice", "project": "x"}
    assert dict(current_scope()) == {}


def test_int_values_become_strings() -> None:
    """Integer attribute values are stored as their decimal text."""
    with scope(tenant=42):
        assert dict(current_scope()) == {"tenant": "42"}


def test_inner_scope_adds_to_and_overrides_outer() -> None:
    """A nested scope keeps the outer attributes, overrides clashing ones, and the outer returns on exit."""
    with scope(user="alice", project="x"):
        with scope(user="bob", team="t"):
            assert dict(current_scope()) == {"user": "bob", "project": "x", "team": "t"}
        assert dict(current_scope()) == {"user": "alice", "project": "x"}
    assert dict(current_scope()) == {}


def test_scope_restored_when_block_raises() -> None:
    """An exception leaving the block still restores the outer scope, and the exception propagates."""
    with scope(user="alice"):
        seen: list[dict[str, str]] = []

        def fail_inside() -> None:
            with scope(user="bob", project="p"):
                seen.append(dict(current_scope()))
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            fail_inside()
        assert seen == [{"user": "bob", "project": "p"}]
        assert dict(current_scope()) == {"user": "alice"}
    assert dict(current_scope()) == {}


def test_same_scope_object_can_be_reentered() -> None:
    """One scope object entered twice (nested) restores each level correctly."""
    alice = scope(user="alice")
    with alice:
        with scope(user="bob"):
            with alice:
                assert dict(current_scope()) == {"user": "alice"}
            assert dict(current_scope()) == {"user": "bob"}
        assert dict(current_scope()) == {"user": "alice"}
    assert dict(current_scope()) == {}


def test_current_scope_is_read_only() -> None:
    """The mapping returned by current_scope() cannot be modified in place."""
    with scope(user="alice"):
        active = current_scope()
        with pytest.raises(TypeError):
            active["user"] = "mallory"  # type: ignore[index]
        assert current_scope()["user"] == "alice"


def test_attributes_property_is_what_the_scope_adds() -> None:
    """scope.attributes holds only this scope's own (validated) attributes."""
    with scope(user="alice"):
        inner = scope(project=7)
        assert dict(inner.attributes) == {"project": "7"}


def test_threads_do_not_share_scopes() -> None:
    """Two threads each in their own scope see only their own attributes, and neither sees the main thread's."""
    both_inside = threading.Barrier(2, timeout=10)
    seen: dict[str, dict[str, str]] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            seen[f"{name}-before"] = dict(current_scope())
            with scope(user=name):
                both_inside.wait()  # both threads are inside their scopes at the same time
                seen[name] = dict(current_scope())
                both_inside.wait()
            seen[f"{name}-after"] = dict(current_scope())
        except BaseException as err:  # surfaced below
            errors.append(err)

    with scope(user="main"):
        threads = [threading.Thread(target=work, args=(n,)) for n in ("t1", "t2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert dict(current_scope()) == {"user": "main"}

    assert errors == []
    assert seen == {
        "t1-before": {},
        "t2-before": {},
        "t1": {"user": "t1"},
        "t2": {"user": "t2"},
        "t1-after": {},
        "t2-after": {},
    }


async def test_async_with_works() -> None:
    """``async with scope(...)`` sets and restores the scope like ``with``."""
    async with scope(user="alice") as active:
        assert dict(active) == {"user": "alice"}
        assert dict(current_scope()) == {"user": "alice"}
    assert dict(current_scope()) == {}


async def test_concurrent_tasks_are_isolated() -> None:
    """Two asyncio tasks, interleaved while each is inside its own scope, each see only their own."""
    entered = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def task(me: str, other: str) -> tuple[dict[str, str], dict[str, str]]:
        async with scope(user=me):
            entered[me].set()
            await entered[other].wait()  # the other task is now inside its scope too
            inside = dict(current_scope())
        return inside, dict(current_scope())

    with scope(project="p"):
        a, b = await asyncio.gather(task("a", "b"), task("b", "a"))
        assert dict(current_scope()) == {"project": "p"}

    assert a == ({"project": "p", "user": "a"}, {"project": "p"})
    assert b == ({"project": "p", "user": "b"}, {"project": "p"})


async def test_task_scope_does_not_leak_to_parent() -> None:
    """A scope entered inside a task never becomes visible to the code that created the task."""

    async def child() -> dict[str, str]:
        with scope(user="child"):
            return dict(current_scope())

    with scope(user="parent"):
        assert await asyncio.create_task(child()) == {"user": "child"}
        assert dict(current_scope()) == {"user": "parent"}


@pytest.mark.parametrize(
    "name",
    [
        "1x",
        "a-b",
        "a b",
        "",
        "ü",
        "x" * 65,
        pytest.param("user\n", id="trailing-newline"),
    ],
)
def test_bad_attribute_names_are_rejected(name: str) -> None:
    """A name that is not an identifier of at most 64 characters raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError) as info:
        scope(**{name: "v"})
    assert info.value.setting == f"scope.{name}"
    assert f"scope.{name}" in str(info.value)


def test_longest_allowed_name_and_value_are_accepted() -> None:
    """A 64-character identifier and a 512-character value are accepted unchanged."""
    name, value = "n" * 64, "v" * 512
    with scope(**{name: value}):
        assert current_scope()[name] == value


@pytest.mark.parametrize(
    "value",
    [1.5, None, b"bytes", ["list"], {"a": 1}, True, False],
    ids=["float", "None", "bytes", "list", "dict", "True", "False"],
)
def test_values_must_be_str_or_int(value: object) -> None:
    """A value that is not str or int (bools included) raises ConfigurationError naming the attribute."""
    with pytest.raises(ConfigurationError) as info:
        scope(user=value)  # type: ignore[arg-type]
    assert info.value.setting == "scope.user"
    assert "scope.user" in str(info.value)


@pytest.mark.parametrize(
    "value",
    ["x" * 513, 10**600, 10**5000],
    ids=["str-513", "int-601-digits", "int-5001-digits"],
)
def test_values_longer_than_512_characters_are_rejected(value: str | int) -> None:
    """A value whose text exceeds 512 characters raises ConfigurationError naming the attribute."""
    with pytest.raises(ConfigurationError) as info:
        scope(note=value)
    assert info.value.setting == "scope.note"
    assert "scope.note" in str(info.value)


def test_rejected_scope_changes_nothing() -> None:
    """A scope that fails validation leaves the current scope untouched."""
    with scope(user="alice"):
        with pytest.raises(ConfigurationError):
            scope(user="bob", bad=1.5)  # type: ignore[arg-type]
        assert dict(current_scope()) == {"user": "alice"}


def test_configuration_error_is_a_value_error() -> None:
    """Scope validation errors can also be caught as ValueError and TokenguardError."""
    with pytest.raises(ValueError, match=r"scope\.x"):
        scope(x=None)  # type: ignore[arg-type]
    with pytest.raises(tokenguard.TokenguardError):
        scope(x=None)  # type: ignore[arg-type]
