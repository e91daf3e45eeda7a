"""The package's public namespace: what ``__all__`` lists, and that everything public is documented."""

from __future__ import annotations

import inspect
import types
from typing import Any

import pytest

import tokenguard


def _public_members() -> dict[str, object]:
    for name in tokenguard.__all__:  # the package imports its names on first use: load them all
        getattr(tokenguard, name)
    return {
        name: value
        for name, value in vars(tokenguard).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def test_all_is_sorted() -> None:
    """tokenguard.__all__ is sorted and has no duplicates."""
    assert tokenguard.__all__ == sorted(tokenguard.__all__)
    assert len(set(tokenguard.__all__)) == len(tokenguard.__all__)


def test_every_name_in_all_exists() -> None:
    """Every name in __all__ is an attribute of the package."""
    missing = [name for name in tokenguard.__all__ if not hasattr(tokenguard, name)]
    assert missing == []


def test_every_public_class_and_function_is_exported() -> None:
    """Every public class or function in the package namespace is listed in __all__ (modules excepted)."""
    public = {
        name
        for name, value in _public_members().items()
        if inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value)
    }
    assert public  # the check below is not vacuous
    assert sorted(public - set(tokenguard.__all__)) == []


def test_all_lists_only_public_members_or_the_version() -> None:
    """__all__ holds the public namespace exactly, plus __version__."""
    assert set(tokenguard.__all__) == set(_public_members()) | {"__version__"}


def test_version_is_a_string() -> None:
    """tokenguard.__version__ is a non-empty string."""
    assert isinstance(tokenguard.__version__, str)
    assert tokenguard.__version__


EXPORTED = [name for name in tokenguard.__all__ if name != "__version__"]


@pytest.mark.parametrize("name", EXPORTED)
def test_every_exported_object_has_a_docstring(name: str) -> None:
    """Every exported class and function has a docstring of its own."""
    obj = getattr(tokenguard, name)
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert doc, f"tokenguard.{name} has no docstring"
    assert doc.strip()


def _own_public_attributes(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties that tokenguard itself defines on ``cls`` or its tokenguard bases."""
    found: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("tokenguard"):
            continue
        for attr, value in vars(klass).items():
            if attr.startswith("_"):
                continue
            if inspect.isfunction(value) or isinstance(value, property | classmethod | staticmethod):
                found[attr] = value
    return sorted(found.items())


CLASSES = [name for name in EXPORTED if inspect.isclass(getattr(tokenguard, name))]


@pytest.mark.parametrize("name", CLASSES)
def test_public_methods_of_exported_classes_have_docstrings(name: str) -> None:
    """Every public method and property tokenguard defines on an exported class has a docstring."""
    cls = getattr(tokenguard, name)
    undocumented = [
        attr
        for attr, value in _own_public_attributes(cls)
        if not (getattr(value, "__func__", value).__doc__ or "").strip()
    ]
    assert undocumented == []


def test_the_package_has_a_docstring() -> None:
    """The tokenguard package itself has a docstring."""
    assert tokenguard.__doc__
    assert tokenguard.__doc__.strip()


def test_importing_the_package_and_its_pytest_plugin_does_not_import_the_sdks() -> None:
    """The pytest plugin loads in every pytest run where tokenguard is installed: importing it
    (and the package) must not pay for the openai and anthropic SDKs (seconds)."""
    import subprocess
    import sys

    code = (
        "import sys, tokenguard, tokenguard.pytest_plugin; "
        "heavy = [m for m in ('openai', 'anthropic', 'genai_prices', 'tiktoken') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


_ONE_SDK = """
import sys, httpx2, tokenguard, tokenguard.testing, tokenguard.pytest_plugin
guard = tokenguard.Guard(store="memory://", retry=tokenguard.Retry(initial_delay_s=0.001))
assert "openai" not in sys.modules and "anthropic" not in sys.modules, "a Guard imported an SDK"
statuses = iter([429, 200])
def answer(request):
    status = next(statuses)
    if status == 429:
        return httpx2.Response(429, json={"error": {"message": "slow down", "type": "rate_limit"}})
    return httpx2.Response(200, json=ANSWER)
http = httpx2.Client(transport=httpx2.MockTransport(answer))
client = tokenguard.{cls}(api_key="sk-test", base_url="http://fake.test/v1", http_client=http, guard=guard)
CALL
row, = guard.store.rows()
assert (row.outcome, row.attempts, row.usage.output_tokens) == ("ok", 2, 5), row
assert "{other}" not in sys.modules, "the other SDK was imported"
print("ok")
"""
_OPENAI_CALL = (
    'client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])',
    {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hello"}}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13},
    },
)
_ANTHROPIC_CALL = (
    'client.messages.create(model="claude-haiku-4-5", max_tokens=20, messages=[{"role": "user", "content": "hi"}])',
    {
        "id": "m1",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": "hello"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 8, "output_tokens": 5},
    },
)


@pytest.mark.parametrize(
    ("cls", "other", "call"),
    [("OpenAI", "anthropic", _OPENAI_CALL), ("Anthropic", "openai", _ANTHROPIC_CALL)],
)
def test_a_program_using_one_sdk_never_imports_the_other(cls: str, other: str, call: tuple[str, Any]) -> None:
    """A Guard (and the testing module) imports neither SDK, and a guarded call of one vendor
    (retried after a 429 and accounted for) imports nothing of the other: importing an SDK
    costs seconds."""
    import json
    import subprocess
    import sys

    code = _ONE_SDK.replace("{cls}", cls).replace("{other}", other).replace("CALL", call[0])
    code = f"ANSWER = {json.dumps(call[1])}\n" + code
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"
