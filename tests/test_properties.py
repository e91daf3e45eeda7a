"""Property tests (issue 10, item 4): request canonicalization, budget arithmetic, and malformed
vendor responses / SSE streams through the real guarded SDK clients.

Every property runs derandomized and without an example database (like test_pricing.py), so CI
sees the same examples on every run. A property that a tokenguard bug breaks is kept, marked
``xfail(strict=True)``, with its minimal falsifying example pinned as an explicit ``@example``:
the fix turns it into an XPASS, which fails the run until the mark is removed.

Oracles are independent of the code under test where possible: JSON equality by value (not
tokenguard's canonical JSON) for the cache key, integer arithmetic for nano-dollars, the bare
SDK client for what a caller must see.
"""

from __future__ import annotations

import inspect
import json
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tokenguard
from tokenguard import _cache
from tokenguard._budget import Budget, BudgetBook, from_nano, to_nano
from tokenguard._errors import BudgetExceeded, TokenguardError
from tokenguard._usage import Usage
from tokenguard.stores.memory import MemoryStore
from tokenguard.stores.sqlite import SQLiteStore
from tokenguard.testing import FakeLLM, Reply, sse


def props(examples: int) -> settings:
    """Derandomized, database-less settings: the same examples on every run, nothing kept between runs."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


TG_SOURCE = Path(tokenguard.__file__).resolve().parent
OAI_MODEL = "gpt-4o"
ANT_MODEL = "claude-haiku-4-5"
OAI_BASE = "http://props-openai.test/v1"
ANT_BASE = "http://props-anthropic.test"
PROMPT = [{"role": "user", "content": "Say hello to a friend."}]
ANSWER = "Hello there, my friend"


def ceil_nano(usd: Decimal) -> int:
    """USD as whole nano-dollars rounded up, by integer arithmetic (the oracle for ``to_nano``)."""
    num, den = usd.as_integer_ratio()
    return -((-num * 10**9) // den)


# =================================================================================================
# (a) request canonicalization: the cache key
# =================================================================================================

# a small alphabet keeps generation fast; still non-ASCII, quotes, escapes and newlines
TEXT = st.text(alphabet='ab z\u00e9\u4e2d\U0001f600"\\\n{}', max_size=6)
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
NUMBER = st.one_of(
    st.integers(-(10**6), 10**6), st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBER, TEXT),
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(TEXT, kids, max_size=3)),
    max_leaves=5,
)
UNIT = st.one_of(st.integers(0, 2), st.floats(min_value=0, max_value=2, allow_nan=False))


@st.composite
def json_schemas(draw: st.DrawFn, depth: int = 1) -> dict[str, Any]:
    """A JSON schema (a tool's parameters, a response format's schema): nested objects and arrays."""
    kind = draw(st.sampled_from(["string", "integer", "number", "boolean", "object", "array"] if depth else ["string"]))
    schema: dict[str, Any] = {"type": kind}
    if draw(st.booleans()):
        schema["description"] = draw(TEXT)
    if kind == "number" and draw(st.booleans()):
        schema["minimum"] = draw(NUMBER)
    if kind == "string" and draw(st.booleans()):
        schema["enum"] = draw(st.lists(TEXT, max_size=3))
    if kind == "object":
        properties = draw(st.dictionaries(NAMES, json_schemas(depth - 1), max_size=2))
        schema["properties"] = properties
        schema["required"] = draw(st.lists(st.sampled_from(sorted(properties)), unique=True)) if properties else []
        if draw(st.booleans()):
            schema["additionalProperties"] = draw(st.booleans())
    if kind == "array":
        schema["items"] = draw(json_schemas(depth - 1))
    return schema


OAI_ROLES = ["system", "developer", "user", "assistant"]
OAI_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(OAI_ROLES), "content": TEXT}, optional={"name": NAMES}),
    st.fixed_dictionaries(
        {
            "role": st.just("user"),
            "content": st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), min_size=1, max_size=2),
        }
    ),
)
OAI_TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": NAMES, "parameters": json_schemas()}, optional={"description": TEXT, "strict": st.booleans()}
        ),
    }
)
OAI_TOOL_CHOICE = st.one_of(
    st.sampled_from(["auto", "none", "required"]),
    st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": NAMES})}),
)
OAI_RESPONSE_FORMAT = st.one_of(
    st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": st.fixed_dictionaries(
                {"name": NAMES, "schema": json_schemas()}, optional={"strict": st.booleans()}
            ),
        }
    ),
)
# the semantic parameters of an OpenAI chat request, with values to draw for each
OAI_PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3-mini"]),
    "temperature": UNIT,
    "top_p": UNIT,
    "max_tokens": st.integers(1, 10**5),
    "max_completion_tokens": st.integers(1, 10**5),
    "seed": st.integers(-(2**31), 2**31),
    "n": st.integers(1, 8),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3)),
    "tools": st.lists(OAI_TOOL, min_size=1, max_size=2),
    "tool_choice": OAI_TOOL_CHOICE,
    "response_format": OAI_RESPONSE_FORMAT,
    "logit_bias": st.dictionaries(st.integers(0, 10**5).map(str), st.integers(-100, 100), max_size=3),
}
ANT_BLOCK = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("text"), "text": TEXT}, optional={"cache_control": st.just({"type": "ephemeral"})}
    ),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": NAMES, "name": NAMES, "input": JSON}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": NAMES, "content": TEXT}),
)
ANT_MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant"]),
        "content": st.one_of(TEXT, st.lists(ANT_BLOCK, min_size=1, max_size=2)),
    }
)
ANT_TOOL = st.fixed_dictionaries(
    {"name": NAMES, "input_schema": json_schemas()},
    optional={"description": TEXT, "cache_control": st.just({"type": "ephemeral"})},
)
ANT_PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["claude-haiku-4-5", "claude-sonnet-4-6"]),
    "max_tokens": st.integers(1, 16_000),  # more needs streaming (the SDK refuses a longer non-streamed call)
    "temperature": UNIT,
    "top_p": UNIT,
    "top_k": st.integers(1, 500),
    "stop_sequences": st.lists(TEXT, max_size=3),
    "system": st.one_of(TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2)),
    "tools": st.lists(ANT_TOOL, min_size=1, max_size=2),
    "tool_choice": st.one_of(
        st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"}]),
        st.fixed_dictionaries({"type": st.just("tool"), "name": NAMES}),
    ),
    "thinking": st.one_of(
        st.just({"type": "disabled"}),
        st.fixed_dictionaries({"type": st.just("enabled"), "budget_tokens": st.integers(1024, 32_000)}),
    ),
}
# fields docs/cache.md names as unable to change the answer (dropped from the key)
NON_SEMANTIC = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")
NON_SEMANTIC_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "user": TEXT,
    "metadata": st.dictionaries(NAMES, TEXT, max_size=3),
    "store": st.booleans(),
    "service_tier": st.sampled_from(["auto", "default", "flex", "priority"]),
    "prompt_cache_key": TEXT,
    "safety_identifier": TEXT,
}


@st.composite
def chat_bodies(draw: st.DrawFn, *, wire: bool = True) -> dict[str, Any]:
    """An OpenAI chat-completions request body (``wire``: also the streaming and unknown future fields)."""
    body: dict[str, Any] = {
        "model": draw(OAI_PARAMS["model"]),
        "messages": draw(st.lists(OAI_MESSAGE, min_size=1, max_size=3)),
    }
    for name in draw(st.sets(st.sampled_from(sorted(set(OAI_PARAMS) - {"model"})), max_size=4)):
        body[name] = draw(OAI_PARAMS[name])
    for name in draw(st.sets(st.sampled_from(NON_SEMANTIC), max_size=3)):
        body[name] = draw(NON_SEMANTIC_VALUES[name])
    if wire:
        body["stream"] = draw(st.booleans())
        if draw(st.booleans()):
            body["stream_options"] = draw(
                st.fixed_dictionaries(
                    {}, optional={"include_usage": st.booleans(), "include_obfuscation": st.booleans()}
                )
            )
        if draw(st.booleans()):
            body["future_knob"] = draw(JSON)  # a field a future API adds: in the key like any other
    return body


@st.composite
def anthropic_bodies(draw: st.DrawFn, *, wire: bool = True) -> dict[str, Any]:
    """An Anthropic messages request body."""
    body: dict[str, Any] = {
        "model": draw(ANT_PARAMS["model"]),
        "max_tokens": draw(ANT_PARAMS["max_tokens"]),
        "messages": draw(st.lists(ANT_MESSAGE, min_size=1, max_size=3)),
    }
    for name in draw(st.sets(st.sampled_from(sorted(set(ANT_PARAMS) - {"model", "max_tokens"})), max_size=4)):
        body[name] = draw(ANT_PARAMS[name])
    if draw(st.booleans()):
        body["metadata"] = draw(st.fixed_dictionaries({}, optional={"user_id": TEXT}))
    if wire:
        body["stream"] = draw(st.booleans())
        if draw(st.booleans()):
            body["future_knob"] = draw(JSON)
    return body


def requests_() -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """(vendor, body): an OpenAI chat or an Anthropic messages request."""
    return st.one_of(st.tuples(st.just("openai"), chat_bodies()), st.tuples(st.just("anthropic"), anthropic_bodies()))


URLS = {"openai": "/chat/completions", "anthropic": "/v1/messages"}
BASES = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}


def key_of(api: str, body: dict[str, Any], **overrides: Any) -> str:
    """The cache key of ``body`` sent as the ``api`` vendor's client sends it (``overrides``: other
    parts of the request)."""
    parts: dict[str, Any] = {
        "vendor": api,
        "base_url": BASES[api],
        "method": "post",
        "url": URLS[api],
        "body": body,
        "headers": {"anthropic-version": "2023-06-01"} if api == "anthropic" else {},
        "tenant": _cache.tenant_of("sk-props-key", None, None),
        "query": None,
    }
    parts.update(overrides)
    return _cache.cache_key(**parts)


def same_json(a: Any, b: Any) -> bool:
    """JSON equality by value: key order is irrelevant and 1 == 1.0, but a bool is never a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def semantic_view(body: dict[str, Any]) -> dict[str, Any]:
    """The request as docs/cache.md says the key sees it: the non-semantic fields dropped, and of
    ``stream_options`` only ``include_usage`` on a streamed request."""
    view = {k: v for k, v in body.items() if k not in NON_SEMANTIC and k != "stream_options"}
    options = body.get("stream_options")
    if body.get("stream") and isinstance(options, dict) and options.get("include_usage"):
        view["stream_options"] = {"include_usage": True}
    return view


def reordered(value: Any, rnd: random.Random) -> Any:
    """``value`` with the keys of every dict, at every depth, in a shuffled order."""
    if isinstance(value, dict):
        keys = list(value)
        rnd.shuffle(keys)
        return {k: reordered(value[k], rnd) for k in keys}
    if isinstance(value, list):
        return [reordered(v, rnd) for v in value]
    return value


def floated(value: Any, rnd: random.Random) -> Any:
    """``value`` with some whole numbers spelled as floats (``0`` as ``0.0``), at every depth."""
    if isinstance(value, dict):
        return {k: floated(v, rnd) for k, v in value.items()}
    if isinstance(value, list):
        return [floated(v, rnd) for v in value]
    if type(value) is int and abs(value) <= 2**53 and rnd.random() < 0.5:
        return float(value)
    return value


@props(100)
@given(request=requests_(), rnd=st.randoms(use_true_random=False), data=st.data())
def test_cache_key_is_stable_under_every_documented_equivalence(
    request: tuple[str, dict[str, Any]], rnd: random.Random, data: st.DataObject
) -> None:
    """The key does not change with dict key order at any depth (messages, tool schemas, metadata,
    response_format ...), with ``0`` spelled ``0.0``, with the non-semantic fields added, changed or
    dropped, with ``stream_options`` other than ``include_usage`` (or any of it on a non-streamed
    request), with a trailing slash on the base URL, or with headers that are not semantic."""
    vendor, body = request
    variant = floated(body, rnd)
    for name in data.draw(st.sets(st.sampled_from(NON_SEMANTIC))):
        if data.draw(st.booleans()):
            variant[name] = data.draw(NON_SEMANTIC_VALUES[name])
        else:
            variant.pop(name, None)
    if vendor == "openai":
        options = dict(body.get("stream_options") or {})
        if not body["stream"] or data.draw(st.booleans()):
            options["include_obfuscation"] = data.draw(st.booleans())  # not include_usage: never in the key
        if not body["stream"]:
            options["include_usage"] = data.draw(st.booleans())  # a request that is not streamed
        if options.get("include_usage") in (False, None) and data.draw(st.booleans()):
            options.pop("include_usage", None)  # include_usage False is the same as absent
        variant["stream_options"] = options
    variant = reordered(variant, rnd)
    assert same_json(semantic_view(body), semantic_view(variant))  # the oracle agrees: an equivalent request
    noise = {
        "x-stainless-retry-count": "1",
        "x-stainless-read-timeout": "9",
        "authorization": "Bearer x",
        "user-agent": "u",
    }
    headers = {"anthropic-version": "2023-06-01"} if vendor == "anthropic" else {}
    picked = dict(
        reordered({**headers, **data.draw(st.dictionaries(st.sampled_from(sorted(noise)), st.just("v")))}, rnd)
    )
    assert key_of(vendor, body) == key_of(vendor, variant, base_url=BASES[vendor] + "/", headers=picked)


def _mutate(vendor: str, body: dict[str, Any], param: str, data: st.DataObject) -> dict[str, Any]:
    """``body`` with ``param`` changed (to a value the oracle calls different)."""
    new = json.loads(json.dumps(body))
    messages = new["messages"]
    if param == "messages.content":
        i = data.draw(st.integers(0, len(messages) - 1))
        messages[i]["content"] = data.draw(st.one_of(TEXT, st.just(str(messages[i]["content"]) + "!")))
    elif param == "messages.role":
        i = data.draw(st.integers(0, len(messages) - 1))
        roles = OAI_ROLES if vendor == "openai" else ["user", "assistant"]
        messages[i]["role"] = data.draw(st.sampled_from([r for r in roles if r != messages[i]["role"]]))
    elif param == "messages.order":
        new["messages"] = data.draw(st.permutations(messages))
    elif param == "messages.count":
        new["messages"] = messages[:-1] if len(messages) > 1 and data.draw(st.booleans()) else [*messages, messages[0]]
    elif param == "future_knob":
        new["future_knob"] = data.draw(JSON)
    else:
        params = OAI_PARAMS if vendor == "openai" else ANT_PARAMS
        new[param] = data.draw(params[param])
    return new


MESSAGE_PARAMS = ["messages.content", "messages.role", "messages.order", "messages.count", "future_knob"]


@pytest.mark.parametrize(
    ("vendor", "param"),
    [("openai", p) for p in [*OAI_PARAMS, *MESSAGE_PARAMS]]
    + [("anthropic", p) for p in [*ANT_PARAMS, *MESSAGE_PARAMS]],
)
@props(12)
@given(rnd=st.randoms(use_true_random=False), data=st.data())
def test_cache_key_changes_with_every_semantic_parameter(
    vendor: str, param: str, rnd: random.Random, data: st.DataObject
) -> None:
    """Changing any one semantic parameter — model, a message's content or role, the messages' order
    or number, temperature, top_p, max_tokens, tools, tool_choice, response_format, seed, stop, n,
    the Anthropic system prompt, an unknown future field ... — changes the key, even with every dict
    of the changed request reordered."""
    body = data.draw(chat_bodies() if vendor == "openai" else anthropic_bodies())
    changed = _mutate(vendor, body, param, data)
    if same_json(semantic_view(body), semantic_view(changed)):  # drew the same value again: nothing changed
        assert key_of(vendor, body) == key_of(vendor, reordered(changed, rnd))
        return
    assert key_of(vendor, body) != key_of(vendor, reordered(changed, rnd))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {k: (_replaced(v, rest, new) if k == head else v) for k, v in value.items()}
    return [(_replaced(v, rest, new) if i == head else v) for i, v in enumerate(value)]


@props(120)
@given(request=requests_(), rnd=st.randoms(use_true_random=False), data=st.data())
def test_cache_key_equal_exactly_when_the_requests_mean_the_same(
    request: tuple[str, dict[str, Any]], rnd: random.Random, data: st.DataObject
) -> None:
    """Replace any one value anywhere in a request (a nested schema's description, a content block,
    a metadata entry ...) with any JSON value, and reorder every dict: the key is the same exactly
    when JSON value equality on the request's semantic part says the two requests are the same."""
    vendor, body = request
    path = data.draw(st.sampled_from(list(_paths(body))))
    changed = reordered(floated(_replaced(body, path, data.draw(JSON)), rnd), rnd)
    expected_same = same_json(semantic_view(body), semantic_view(changed))
    assert (key_of(vendor, body) == key_of(vendor, changed)) is expected_same, path


@props(60)
@given(
    request=requests_(),
    which=st.sampled_from(["vendor", "base_url", "url", "tenant", "header", "query"]),
    data=st.data(),
)
def test_cache_key_changes_with_vendor_endpoint_base_url_credentials_headers_query(
    request: tuple[str, dict[str, Any]], which: str, data: st.DataObject
) -> None:
    """The same body under another vendor, endpoint, base URL (not just a trailing slash), API key /
    organization / project, semantic header (anthropic-beta, anthropic-version, openai-beta) or query
    string has another key."""
    vendor, body = request
    base = key_of(vendor, body)
    if which == "vendor":
        other: dict[str, Any] = {
            "vendor": data.draw(st.sampled_from([v for v in ("openai", "azure", "anthropic") if v != vendor]))
        }
    elif which == "base_url":
        host = data.draw(NAMES)
        other = {"base_url": f"https://{host}.example.test/v1"}
    elif which == "url":
        other = {
            "url": data.draw(st.sampled_from(["/responses", "/completions", "/embeddings", "/v1/messages/batches"]))
        }
    elif which == "tenant":
        # (api key, organization, project): this alphabet cannot spell the base key "sk-props-key"
        secrets = data.draw(
            st.lists(
                st.one_of(st.none(), st.text(alphabet="abcdefgh-_0123456789", max_size=12)), min_size=3, max_size=3
            )
        )
        other = {"tenant": _cache.tenant_of(*secrets)}
    elif which == "header":
        name = data.draw(st.sampled_from(["anthropic-beta", "openai-beta", "anthropic-version"]))
        other = {"headers": {"anthropic-version": "2023-06-01", name: "x-" + data.draw(NAMES)}}
    else:
        other = {"query": {data.draw(NAMES): data.draw(TEXT)}}
    assert key_of(vendor, body, **other) != base


@props(80)
@given(
    keys=st.lists(
        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),
        min_size=2,
        max_size=2,
        unique=True,
    ),
    org=st.one_of(st.none(), NAMES),
)
def test_different_api_keys_never_share_a_tenant(keys: list[str], org: str | None) -> None:
    """Two different API keys (same organization) always have different tenant fingerprints, and the
    fingerprint never contains the key."""
    first, second = (_cache.tenant_of(k, None, org, None) for k in keys)
    assert first != second
    assert all(k not in t for k in keys for t in (first, second) if len(k) >= 8)


# -- (a) end to end, through the official SDK clients ----------------------------------------------


def _sent(fake: FakeLLM) -> int:
    return len(fake.money_requests)


def _cached_guard() -> tokenguard.Guard:
    return tokenguard.Guard(store="memory://", cache=tokenguard.Cache("memory", cache_all=True), retry=False)


_SDK_ARGS = {
    "openai": frozenset(inspect.signature(openai.resources.chat.Completions.create).parameters) - {"self"},
    "anthropic": frozenset(inspect.signature(anthropic.resources.Messages.create).parameters) - {"self"},
}


def sdk_kwargs(vendor: str, body: dict[str, Any]) -> dict[str, Any]:
    """The SDK call that sends ``body``: its parameters as keywords, any field the SDK has no
    parameter for (Anthropic's temperature / top_k, a future field) in ``extra_body``."""
    kwargs = {k: v for k, v in body.items() if k in _SDK_ARGS[vendor]}
    extra = {k: v for k, v in body.items() if k not in _SDK_ARGS[vendor]}
    return {**kwargs, "extra_body": extra} if extra else kwargs


@props(30)
@given(
    request=requests_(),
    rnd=st.randoms(use_true_random=False),
    param=st.sampled_from(["model", "temperature", "max_tokens", "tools", "tool_choice", *MESSAGE_PARAMS]),
    data=st.data(),
)
def test_sdk_requests_share_an_entry_exactly_when_they_mean_the_same(
    request: tuple[str, dict[str, Any]], rnd: random.Random, param: str, data: st.DataObject
) -> None:
    """Through the real guarded SDK client: a request with every dict reordered (extra_body too),
    whole numbers as floats, the non-semantic fields changed, another timeout and an x-stainless
    header is answered from the cache; the same request with one semantic parameter changed (one
    the SDK has a parameter for, or one sent in extra_body) is sent."""
    vendor, body = request
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}  # not streamed
    fake, guard = FakeLLM(), _cached_guard()
    client = fake.openai(guard=guard) if vendor == "openai" else fake.anthropic(guard=guard)
    create = client.chat.completions.create if vendor == "openai" else client.messages.create
    create(**sdk_kwargs(vendor, body))
    assert _sent(fake) == 1
    same = floated(body, rnd)
    for name in data.draw(st.sets(st.sampled_from(["user", "metadata"] if vendor == "openai" else ["metadata"]))):
        same[name] = data.draw(NON_SEMANTIC_VALUES[name]) if vendor == "openai" else {"user_id": data.draw(TEXT)}
    timeout = data.draw(st.floats(1, 600))
    create(**sdk_kwargs(vendor, reordered(same, rnd)), timeout=timeout, extra_headers={"x-stainless-props": "1"})
    assert _sent(fake) == 1  # answered from the cache
    changed = _mutate(vendor, body, param, data)
    create(**sdk_kwargs(vendor, reordered(changed, rnd)))
    assert _sent(fake) == (1 if same_json(semantic_view(body), semantic_view(changed)) else 2)


CREDENTIALS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=24)


@props(30)
@given(
    vendor=st.sampled_from(["openai", "anthropic"]),
    which=st.sampled_from(["api_key", "organization", "project", "base_url"]),
    values=st.lists(CREDENTIALS, min_size=2, max_size=2, unique=True),
)
def test_sdk_clients_with_other_credentials_or_base_url_never_share_an_entry(
    vendor: str, which: str, values: list[str]
) -> None:
    """Two guarded clients that differ only in API key (or organization, project, base URL) never
    answer each other's requests from the cache."""
    if vendor == "anthropic" and which in ("organization", "project"):
        which = "api_key"
    fake, guard = FakeLLM(), _cached_guard()

    def client(value: str) -> Any:
        given_ = {"base_url": f"http://{value}.props.test/v1"} if which == "base_url" else {which: value}
        return fake.openai(guard=guard, **given_) if vendor == "openai" else fake.anthropic(guard=guard, **given_)

    for value in values:
        c = client(value)
        if vendor == "openai":
            c.chat.completions.create(model=OAI_MODEL, messages=PROMPT, temperature=0)
        else:
            c.messages.create(model=ANT_MODEL, max_tokens=64, messages=PROMPT)
    assert _sent(fake) == 2


@props(10)
@example(keys=["a", "b"])
@given(keys=st.lists(CREDENTIALS, min_size=2, max_size=2, unique=True))
def test_sdk_clients_with_key_providers_never_share_an_entry(keys: list[str]) -> None:
    """Two guarded OpenAI clients whose API keys come from key providers (``api_key=callable``)
    never answer each other's requests from the cache."""
    # was falsified by keys=["a", "b"]: the second client's request was a cache hit
    fake, guard = FakeLLM(), _cached_guard()
    for key in keys:
        client = fake.openai(guard=guard, api_key=lambda key=key: key)
        client.chat.completions.create(model=OAI_MODEL, messages=PROMPT, temperature=0)
    assert _sent(fake) == 2
    assert [r.headers["authorization"] for r in fake.money_requests] == [f"Bearer {k}" for k in keys]


@props(10)
@example(bias=[(1, True), (2, False)])
@given(bias=st.lists(st.tuples(st.integers(0, 10**5), st.booleans()), min_size=1, max_size=4, unique_by=lambda t: t[0]))
def test_a_body_the_sdk_sends_is_keyed_like_its_wire_json(bias: list[tuple[int, bool]]) -> None:
    """A cacheable request whose ``logit_bias`` names token ids as ints (some, or all) is sent like
    the bare SDK sends it, and keyed like the JSON on the wire (where every key is a string)."""
    # minimal falsifying example: logit_bias={"1": 0, 2: 0} -> TypeError from tokenguard/_cache.py
    logit_bias: dict[Any, int] = {(str(t) if as_text else t): 0 for t, as_text in bias}
    fake, guard = FakeLLM(), _cached_guard()
    bare = fake.vendor_openai().chat.completions.create(
        model=OAI_MODEL, messages=PROMPT, temperature=0, logit_bias=logit_bias
    )
    client = fake.openai(guard=guard)
    first = client.chat.completions.create(model=OAI_MODEL, messages=PROMPT, temperature=0, logit_bias=logit_bias)
    wire = {str(k): v for k, v in logit_bias.items()}
    again = client.chat.completions.create(model=OAI_MODEL, messages=PROMPT, temperature=0, logit_bias=wire)
    assert first.model_dump() == bare.model_dump() == again.model_dump()
    assert _sent(fake) == 2  # the bare call and the first guarded one; the wire spelling is a hit


# =================================================================================================
# (b) budget arithmetic
# =================================================================================================


@props(300)
@given(
    usd=st.one_of(
        st.decimals(min_value=0, max_value=1, places=9),
        st.decimals(min_value=0, max_value=Decimal("9999999999999999999.999999999"), places=9),
    )
)
def test_to_nano_and_from_nano_round_trip_exactly_up_to_nine_places(usd: Decimal) -> None:
    """Any amount with at most 9 decimal places (up to 28 significant digits) is a whole number of
    nano-dollars: ``to_nano`` is exact and ``from_nano`` gives the very amount back."""
    nano = to_nano(usd)
    assert type(nano) is int
    assert nano == ceil_nano(usd) == int(usd.scaleb(9))
    assert from_nano(nano) == usd
    assert to_nano(from_nano(nano)) == nano


@props(200)
@example(nano=0)
@example(nano=10**40 + 7)
@given(nano=st.one_of(st.integers(-(10**12), 10**12), st.integers(-(10**45), 10**45)))
def test_from_nano_is_exact_at_any_size_with_no_trailing_zeros(nano: int) -> None:
    """``from_nano`` is exact beyond 28 digits, prints zero as ``0`` (never ``0E-9``) and keeps
    no trailing zeros after the point, as the ledger writes amounts."""
    usd = from_nano(nano)
    assert Fraction(usd) == Fraction(nano, 10**9)
    text = format(usd, "f")
    assert text == "0" if nano == 0 else not ("." in text and text.endswith("0"))


@props(200)
@given(digits=st.one_of(st.integers(0, 10**6), st.integers(0, 10**20)), places=st.integers(10, 18))
def test_to_nano_rounds_sub_nano_amounts_up(digits: int, places: int) -> None:
    """An amount with more than 9 decimal places (up to 28 significant digits) is rounded *up* to the
    next nano-dollar (budgets never under-count), by less than one nano-dollar."""
    usd = Decimal(digits).scaleb(-places)
    nano = to_nano(usd)
    assert nano == ceil_nano(usd)
    assert Decimal(0) <= from_nano(nano) - usd < Decimal("1e-9")


@props(50)
@example(usd=Decimal("10000000000000000000.000000001"))
@given(usd=st.decimals(min_value=Decimal("1e19"), max_value=Decimal("1e21"), places=9))
def test_to_nano_never_under_counts_huge_amounts(usd: Decimal) -> None:
    """``to_nano`` rounds up, whatever the amount's size."""
    # minimal falsifying example: usd=Decimal("10000000000000000000.000000001") -> to_nano gives 10**28
    assert to_nano(usd) == ceil_nano(usd)


SMALL_AMOUNTS = st.one_of(
    st.decimals(min_value=0, max_value=1, places=9),
    st.decimals(min_value=0, max_value=5, places=12),  # sub-nano amounts: rounded up to whole nano-dollars
)
AMOUNTS = st.one_of(SMALL_AMOUNTS, st.decimals(min_value=0, max_value=100_000_000, places=9))
LIMITS = st.one_of(
    st.decimals(min_value=0, max_value=20, places=9), st.decimals(min_value=0, max_value=2_000_000_000, places=9)
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), SMALL_AMOUNTS),
        st.tuples(st.just("admit"), AMOUNTS),
        st.tuples(st.just("settle"), st.integers(0, 50), st.fractions(0, 1)),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("charge"), SMALL_AMOUNTS),
    ),
    max_size=25,
)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tg-props-") as tmp:
        yield Path(tmp)


def _open_store(kind: str, where: Path) -> Any:
    if kind == "memory":
        return MemoryStore()
    return SQLiteStore(Path(tempfile.mkdtemp(dir=where)) / "ledger.db", write_behind_s=0)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@props(40)
@given(limit=LIMITS, ops=OPS)
def test_budget_reservations_and_settles_never_drift(kind: str, scratch: Path, limit: Decimal, ops: list[Any]) -> None:
    """For any sequence of reserve / settle / release / unreserved charges with Decimal amounts (up to
    $100M, 9 or 12 decimal places; caps up to $2B, inside the SQLite store's documented ~$9.2B
    nano-dollar counters), on the memory and the SQLite store: settled spend is exactly the
    sum of the settled amounts (each rounded up to a nano-dollar), held is exactly what outstanding
    reservations hold, neither is ever negative, a reservation is admitted exactly when it fits under
    the cap (so admitted reservations never take spend + held past it), and held is back to 0 once
    every reservation is settled or released."""
    store = _open_store(kind, scratch)
    try:
        budget = Budget(limit_usd=limit, period="total", alerts=())
        now = datetime(2030, 1, 1, tzinfo=UTC)
        book = BudgetBook([budget], store=store, on_alert=[], clock=lambda: now, hold_s=3600)
        spent, held = 0, 0  # nano-dollars, by the oracle
        holds: list[tuple[Any, int]] = []

        def check() -> None:
            status = book.status({})[0]
            assert status.spent_usd == from_nano(spent)
            assert status.spent_usd >= 0
            assert status.held_usd == from_nano(held)
            assert status.held_usd >= 0

        for op in ops:
            if op[0] == "admit":
                need = ceil_nano(op[1])
                fits = spent + held + need <= ceil_nano(limit)
                try:
                    hold = book.admit({}, op[1], 0)
                except BudgetExceeded:
                    assert not fits
                else:
                    assert fits
                    holds.append((hold, need))
                    held += need
                    assert spent + held <= ceil_nano(limit)
            elif op[0] == "charge":  # a billed response with no reservation left (a second one)
                book.settle(None, {}, Usage(), op[1])
                spent += ceil_nano(op[1])
            elif holds:
                hold, need = holds.pop(op[1] % len(holds))
                if op[0] == "settle":  # an actual cost up to what was reserved
                    cost = (from_nano(need) * Decimal(op[2].numerator) / Decimal(op[2].denominator)).quantize(
                        Decimal("1e-12")
                    )
                    book.settle(hold, {}, Usage(), cost)
                    spent += ceil_nano(cost)
                else:
                    book.release(hold, {})
                held -= need
            check()
        for hold, need in holds:
            book.release(hold, {})
            held -= need
        check()
        assert held == 0
    finally:
        store.close()


CALL_KINDS = ["chat", "chat_stream", "responses", "messages", "messages_stream", "embeddings"]


@st.composite
def replies(draw: st.DrawFn) -> tuple[str, Reply]:
    kind = draw(st.sampled_from(CALL_KINDS))
    inp = draw(st.one_of(st.integers(1, 5000), st.integers(1, 10**7)))
    read = draw(st.integers(0, inp))
    write = draw(st.integers(0, inp - read))
    out = 0 if kind == "embeddings" else draw(st.integers(0, 10**6))
    reply = Reply(
        input_tokens=inp,
        output_tokens=out,
        cache_read_tokens=0 if kind == "embeddings" else read,
        cache_write_tokens=0 if kind == "embeddings" else write,
        cache_write_1h_tokens=0 if kind == "embeddings" else draw(st.integers(0, write)),
        reasoning_tokens=draw(st.integers(0, out)),
    )
    return kind, reply


def _call(client: Any, kind: str) -> None:
    if kind == "chat":
        client.chat.completions.create(model=OAI_MODEL, messages=PROMPT)
    elif kind == "chat_stream":
        list(
            client.chat.completions.create(
                model=OAI_MODEL, messages=PROMPT, stream=True, stream_options={"include_usage": True}
            )
        )
    elif kind == "responses":
        client.responses.create(model=OAI_MODEL, input="hi")
    elif kind == "embeddings":
        client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    elif kind == "messages":
        client.messages.create(model=ANT_MODEL, max_tokens=4096, messages=PROMPT)
    else:
        list(client.messages.create(model=ANT_MODEL, max_tokens=4096, messages=PROMPT, stream=True))


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@props(20)
@given(calls=st.lists(replies(), min_size=1, max_size=6))
def test_guard_spent_is_the_exact_sum_of_the_ledger(kind: str, scratch: Path, calls: list[tuple[str, Reply]]) -> None:
    """After N guarded calls through FakeLLM (chat, streams, Responses, embeddings, Anthropic, with
    cache reads and writes), ``guard.spent()`` and ``stats().spent_usd`` are exactly the sum of the
    ledger rows' ``cost_usd``, the budget's settled spend is that sum in nano-dollars rounded up per
    call, nothing stays held, and no row is negative or estimated."""
    store = "memory://" if kind == "memory" else f"sqlite:///{tempfile.mkdtemp(dir=scratch)}/ledger.db"
    guard = tokenguard.Guard(store=store, retry=False, budgets=[Budget(limit_usd=10**9, period="total", alerts=())])
    try:
        fake = FakeLLM().queue(*(reply for _, reply in calls))
        oai, ant = fake.openai(guard=guard), fake.anthropic(guard=guard)
        for call_kind, _ in calls:
            _call(ant if call_kind.startswith("messages") else oai, call_kind)
        rows = list(guard.store.rows())
        assert len(rows) == len(calls)
        assert all(r.cost_usd is not None and r.cost_usd >= 0 and not r.estimated for r in rows)
        total = sum((r.cost_usd for r in rows if r.cost_usd is not None), Decimal(0))
        assert guard.spent() == total
        assert guard.stats().spent_usd == total
        status = guard.budget_status()[0]
        assert status.spent_usd == from_nano(sum(ceil_nano(r.cost_usd) for r in rows if r.cost_usd is not None))
        assert status.held_usd == 0
    finally:
        guard.close()


# =================================================================================================
# (c) malformed vendor responses and SSE streams, through the real guarded SDK clients
# =================================================================================================

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()


@dataclass(frozen=True)
class Case:
    """One scripted answer to one call: what the fake API sends back, and what it reports.

    ``reported``: the (input, output) counts the body validly reports (every top-level count a
    non-negative int, Anthropic's cache counts added to the input), ``None`` when it reports none
    validly, or ``"?"`` when the body was damaged so that this is not known.
    """

    kind: str  # chat | chat_stream | responses | messages | messages_stream
    body: bytes
    content_type: str = "application/json"
    status: int = 200
    reported: tuple[int, int] | str | None = "?"
    usage_present: bool = False  # the body carries some usage (possibly malformed)

    @property
    def vendor(self) -> str:
        return "anthropic" if self.kind.startswith("messages") else "openai"

    @property
    def stream(self) -> bool:
        return self.kind.endswith("_stream")


def valid(value: Any) -> bool:
    return type(value) is int and value >= 0


def zero_unless_valid(value: Any) -> int:
    return value if valid(value) else 0


def put(target: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    if value is not MISSING:
        target[key] = value
    return target


def chat_json(usage: Any) -> bytes:
    body = {
        "id": "chatcmpl-props",
        "object": "chat.completion",
        "created": 0,
        "model": OAI_MODEL,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {"role": "assistant", "content": ANSWER, "refusal": None},
            }
        ],
    }
    return json.dumps(put(body, "usage", usage)).encode()


def chat_blocks(usage: Any) -> list[bytes]:
    chunk = {"id": "chatcmpl-props", "object": "chat.completion.chunk", "created": 0, "model": OAI_MODEL}
    events: list[tuple[str | None, Any]] = [
        (None, {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        (None, {**chunk, "choices": [{"index": 0, "delta": {"content": ANSWER}}]}),
        (None, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    ]
    if usage is not MISSING:
        events.append((None, {**chunk, "choices": [], "usage": usage}))
    events.append((None, "[DONE]"))
    return sse(events)


def responses_json(usage: Any) -> bytes:
    body = {
        "id": "resp_props",
        "object": "response",
        "created_at": 0,
        "model": OAI_MODEL,
        "status": "completed",
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "output": [
            {
                "type": "message",
                "id": "msg_props",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": ANSWER, "annotations": []}],
            }
        ],
    }
    return json.dumps(put(body, "usage", usage)).encode()


def _message(usage: Any, *, content: list[Any]) -> dict[str, Any]:
    message = {
        "id": "msg_props",
        "type": "message",
        "role": "assistant",
        "model": ANT_MODEL,
        "content": content,
        "stop_reason": "end_turn" if content else None,
        "stop_sequence": None,
    }
    return put(message, "usage", usage)


def messages_json(usage: Any) -> bytes:
    return json.dumps(_message(usage, content=[{"type": "text", "text": ANSWER}])).encode()


def messages_blocks(start_usage: Any, delta_usage: Any) -> list[bytes]:
    delta = put(
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}, "usage", delta_usage
    )
    return sse(
        [
            ("message_start", {"type": "message_start", "message": _message(start_usage, content=[])}),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ANSWER}},
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", delta),
            ("message_stop", {"type": "message_stop"}),
        ]
    )


def reported_counts(kind: str, usage: Any) -> tuple[int, int] | None:
    """The oracle: the (input, output) a usage object validly reports, by the vendor's documented fields."""
    if not isinstance(usage, dict):
        return None
    if kind.startswith("messages"):
        inp, out = usage.get("input_tokens"), usage.get("output_tokens")
        if not (valid(inp) and valid(out)):
            return None
        cache = zero_unless_valid(usage.get("cache_creation_input_tokens")) + zero_unless_valid(
            usage.get("cache_read_input_tokens")
        )
        return inp + cache, out
    names = ("input_tokens", "output_tokens") if kind == "responses" else ("prompt_tokens", "completion_tokens")
    inp, out = usage.get(names[0]), usage.get(names[1])
    return (inp, out) if valid(inp) and valid(out) else None


def merged_stream_usage(start: Any, delta: Any) -> Any:
    """An Anthropic stream's usage, merged as the API documents it: message_start's counts, updated
    by message_delta's (a null there means unchanged); MISSING when neither carries a usage object."""
    if not isinstance(start, dict) and not isinstance(delta, dict):
        return MISSING
    merged = dict(start) if isinstance(start, dict) else {}
    if isinstance(delta, dict):
        merged.update({k: v for k, v in delta.items() if v is not None})
    return merged


def make_case(
    kind: str, usage: Any = MISSING, *, delta_usage: Any = MISSING, blocks: list[bytes] | None = None
) -> Case:
    """A well-formed answer of ``kind`` carrying ``usage`` (for an Anthropic stream: message_start's,
    with ``delta_usage`` on message_delta); ``blocks`` overrides a stream's body."""
    if kind == "chat":
        body = chat_json(usage)
    elif kind == "responses":
        body = responses_json(usage)
    elif kind == "messages":
        body = messages_json(usage)
    elif kind == "chat_stream":
        body = b"".join(blocks if blocks is not None else chat_blocks(usage))
    else:
        body = b"".join(blocks if blocks is not None else messages_blocks(usage, delta_usage))
        usage = merged_stream_usage(usage, delta_usage)
    return Case(
        kind=kind,
        body=body,
        content_type="text/event-stream" if kind.endswith("_stream") else "application/json",
        reported=reported_counts(kind, usage),
        usage_present=usage is not MISSING and usage is not None,
    )


# -- strategies for usage objects ------------------------------------------------------------------

VALID_INPUT = st.one_of(st.integers(1, 10**6), st.integers(10**12, 10**15))
VALID_OUTPUT = st.one_of(st.integers(0, 10**6), st.just(10**15))
# junk a count may hold that neither the SDK nor a reader can take as a number (no numeric strings,
# whole floats or bools, which the SDK's lax parsing may turn into ints)
JUNK = st.one_of(
    st.none(),
    st.integers(-(10**15), -1),
    st.text(alphabet="abcxyz ", max_size=4),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    st.just([]),
    st.just({}),
)
MAYBE_JUNK_OBJECT = st.one_of(st.just(MISSING), st.none(), st.text(max_size=3), st.just([1]))


def _opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(MISSING), strategy)


@st.composite
def openai_usages(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """A usage object with valid top-level counts; its details valid (never more than the whole) or junk."""
    names = (
        ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")
        if kind == "responses"
        else (
            "prompt_tokens",
            "completion_tokens",
            "prompt_tokens_details",
            "completion_tokens_details",
        )
    )
    inp, out = draw(VALID_INPUT), draw(VALID_OUTPUT)
    usage: dict[str, Any] = {names[0]: inp, names[1]: out}
    put(usage, "total_tokens", draw(_opt(st.one_of(st.just(inp + out), JUNK))))
    if draw(st.booleans()):
        cached = draw(st.one_of(st.integers(0, inp), JUNK))
        room = inp - cached if valid(cached) else inp
        details: dict[str, Any] = {}
        put(details, "cached_tokens", draw(_opt(st.just(cached))))
        put(details, "cache_write_tokens", draw(_opt(st.one_of(st.integers(0, room), JUNK))))
        usage[names[2]] = details
    else:
        put(usage, names[2], draw(MAYBE_JUNK_OBJECT))
    if draw(st.booleans()):
        usage[names[3]] = put({}, "reasoning_tokens", draw(_opt(st.one_of(st.integers(0, out), JUNK))))
    else:
        put(usage, names[3], draw(MAYBE_JUNK_OBJECT))
    return usage


@st.composite
def anthropic_usages(draw: st.DrawFn) -> dict[str, Any]:
    """A usage object with valid input / output counts; cache, thinking, tier and iterations valid or junk."""
    usage: dict[str, Any] = {"input_tokens": draw(VALID_INPUT), "output_tokens": draw(VALID_OUTPUT)}
    for name in ("cache_creation_input_tokens", "cache_read_input_tokens"):
        put(usage, name, draw(_opt(st.one_of(st.integers(0, 10**6), st.just(10**15), JUNK))))
    put(
        usage,
        "cache_creation",
        draw(
            _opt(
                st.one_of(
                    JUNK,
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "ephemeral_1h_input_tokens": st.one_of(st.integers(0, 10**15), JUNK),
                            "ephemeral_5m_input_tokens": st.one_of(st.integers(0, 10**6), JUNK),
                        },
                    ),
                )
            )
        ),
    )
    put(
        usage,
        "output_tokens_details",
        draw(
            _opt(
                st.one_of(
                    JUNK,
                    st.fixed_dictionaries({}, optional={"thinking_tokens": st.one_of(st.integers(0, 10**15), JUNK)}),
                )
            )
        ),
    )
    put(
        usage,
        "service_tier",
        draw(_opt(st.one_of(st.sampled_from(["standard", "batch", "priority"]), TEXT, st.none()))),
    )
    # compaction entries are priced on top (tested elsewhere); here: no iterations or harmless ones
    put(
        usage,
        "iterations",
        draw(
            _opt(
                st.one_of(
                    st.none(),
                    st.just([]),
                    st.lists(
                        st.fixed_dictionaries({"type": st.just("message"), "input_tokens": st.integers(0, 9)}),
                        max_size=2,
                    ),
                )
            )
        ),
    )
    return usage


NO_USAGE = st.sampled_from([MISSING, None])


@st.composite
def sound_cases(draw: st.DrawFn) -> Case:
    """Answers whose usage is either absent (null, left out, no usage chunk) or valid at the top level
    with valid-or-junk details; streams possibly damaged by SDK-ignored junk lines, CRLF line ends,
    junk blocks (never before an Anthropic stream's first event) or truncation."""
    kind = draw(st.sampled_from(["chat", "chat_stream", "responses", "messages", "messages_stream"]))
    if kind == "messages_stream":
        if draw(st.booleans()):
            case = make_case(kind, draw(NO_USAGE), delta_usage=draw(NO_USAGE))
        else:
            start = draw(anthropic_usages())
            start["output_tokens"] = draw(st.integers(0, 3))
            delta = draw(
                _opt(
                    st.fixed_dictionaries(
                        {"output_tokens": VALID_OUTPUT},
                        optional={
                            n: st.none()
                            for n in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
                        },
                    )
                )
            )
            case = make_case(kind, start, delta_usage=delta)
    else:
        usage = draw(st.one_of(NO_USAGE, anthropic_usages() if kind.startswith("messages") else openai_usages(kind)))
        case = make_case(kind, usage)
    if not case.stream:
        return case
    blocks = _blocks(case.body)
    damaged = False
    for _ in range(draw(st.integers(0, 3))):  # junk lines inside events: the SDK ignores them
        i = draw(st.integers(0, len(blocks) - 1))
        line = draw(st.sampled_from([b": keep-alive\n", b"garbage\n", b"x-junk: 1\n", b":\n"]))
        blocks[i] = line + blocks[i]
    for _ in range(draw(st.integers(0, 3))):  # whole junk blocks: the SDK yields no event for them
        first = 1 if kind == "messages_stream" else 0  # a known bug: test_sse_blocks_before_the_first_event_...
        blocks.insert(
            draw(st.integers(first, len(blocks))), draw(st.sampled_from([b": keep-alive\n\n", b"garbage\n\n", b"\n\n"]))
        )
    body = b"".join(blocks)
    if draw(st.booleans()):
        body = body.replace(b"\n", b"\r\n")
    if draw(st.integers(0, 3)) == 0:
        body, damaged = body[: draw(st.integers(0, len(body) - 1))], True
    return Case(
        kind, body, case.content_type, reported="?" if damaged else case.reported, usage_present=case.usage_present
    )


def _blocks(body: bytes) -> list[bytes]:
    return [part + b"\n\n" for part in body.split(b"\n\n") if part]


@st.composite
def invalid_count_cases(draw: st.DrawFn) -> Case:
    """Answers carrying a usage object whose top-level input or output count is missing, null,
    negative or not an integer (the other one valid, huge or just as broken)."""
    kind = draw(st.sampled_from(["chat", "chat_stream", "responses", "messages", "messages_stream"]))
    if kind.startswith("messages") or kind == "responses":
        names = ("input_tokens", "output_tokens")
    else:
        names = ("prompt_tokens", "completion_tokens")
    broken = draw(st.sets(st.sampled_from(names), min_size=1))
    usage: dict[str, Any] = {}
    for name, good in zip(names, (VALID_INPUT, VALID_OUTPUT), strict=True):
        put(usage, name, draw(st.one_of(st.just(MISSING), JUNK)) if name in broken else draw(good))
    if kind == "messages_stream":
        # message_start carries the counts; message_delta repeats the output (or, with its usage
        # left out, leaves message_start's)
        delta = MISSING
        if usage.get("output_tokens") is not None and draw(st.booleans()):
            delta = {"output_tokens": usage["output_tokens"]}
        return make_case(kind, usage, delta_usage=delta)
    return make_case(kind, usage)


@st.composite
def cache_heavy_cases(draw: st.DrawFn) -> Case:
    """OpenAI answers whose cached (and cache-written) token counts exceed the whole prompt."""
    kind = draw(st.sampled_from(["chat", "chat_stream", "responses"]))
    inp, out = draw(st.integers(1, 10**6)), draw(st.integers(0, 10**6))
    cached = draw(st.integers(0, 10**15))
    names = (
        ("input_tokens", "output_tokens", "input_tokens_details")
        if kind == "responses"
        else ("prompt_tokens", "completion_tokens", "prompt_tokens_details")
    )
    usage = {
        names[0]: inp,
        names[1]: out,
        names[2]: {"cached_tokens": cached, "cache_write_tokens": draw(st.integers(0, 10**6))},
    }
    return make_case(kind, usage)


@st.composite
def iteration_cases(draw: st.DrawFn) -> Case:
    """Anthropic answers whose ``usage.iterations`` is a truthy scalar, not a list."""
    kind = draw(st.sampled_from(["messages", "messages_stream"]))
    usage = {
        "input_tokens": draw(st.integers(1, 1000)),
        "output_tokens": draw(st.integers(0, 3)),
        "iterations": draw(st.one_of(st.integers(1, 10**6), st.floats(min_value=0.5, max_value=1e6), st.just(True))),
    }
    delta = {"output_tokens": draw(st.integers(0, 1000))}
    return make_case(kind, usage, delta_usage=delta) if kind == "messages_stream" else make_case(kind, usage)


@st.composite
def raw_junk_cases(draw: st.DrawFn) -> Case:
    """Bodies that are not what the endpoint sends at all: junk bytes, other JSON, a cut-off valid
    body, under any content type and status."""
    kind = draw(st.sampled_from(["chat", "chat_stream", "responses", "messages", "messages_stream"]))
    good = draw(st.one_of(sound_cases(), invalid_count_cases())).body
    body = draw(
        st.one_of(
            st.binary(max_size=40),
            JSON.map(lambda v: json.dumps(v).encode()),
            st.integers(0, max(len(good) - 1, 0)).map(lambda n: good[:n]),
        )
    )
    content_type = draw(st.sampled_from(["application/json", "text/event-stream", "text/plain"]))
    status = draw(st.sampled_from([200, 200, 200, 400, 429, 500, 529]))
    return Case(kind, body, content_type, status)


ALL_CASES = st.one_of(sound_cases(), invalid_count_cases(), cache_heavy_cases(), iteration_cases(), raw_junk_cases())


# -- running a case through the bare and the guarded SDK client -------------------------------------


@dataclass
class Seen:
    """What a caller got: the result (plain data) or the exception, with a stream's items before it."""

    value: Any
    error: BaseException | None

    def same_as(self, other: Seen) -> bool:
        if (self.error is None) != (other.error is None):
            return False
        if self.error is not None and other.error is not None:
            return (
                type(self.error) is type(other.error)
                and str(self.error) == str(other.error)
                and self.value == other.value
            )
        return bool(self.value == other.value)


def _plain(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(warnings=False)
    return value


def invoke(client: Any, case: Case) -> Seen:
    """Make the call ``case`` answers, consume it (a stream to its end), and close what it opened."""
    stream = None
    items: list[Any] = []
    try:
        if case.kind == "chat":
            return Seen(_plain(client.chat.completions.create(model=OAI_MODEL, messages=PROMPT, max_tokens=64)), None)
        if case.kind == "responses":
            return Seen(_plain(client.responses.create(model=OAI_MODEL, input="hi", max_output_tokens=64)), None)
        if case.kind == "messages":
            return Seen(_plain(client.messages.create(model=ANT_MODEL, max_tokens=64, messages=PROMPT)), None)
        if case.kind == "chat_stream":
            stream = client.chat.completions.create(
                model=OAI_MODEL, messages=PROMPT, max_tokens=64, stream=True, stream_options={"include_usage": True}
            )
        else:
            stream = client.messages.create(model=ANT_MODEL, max_tokens=64, messages=PROMPT, stream=True)
        for item in stream:
            items.append(_plain(item))
        return Seen(items, None)
    except Exception as err:
        return Seen(items, err)
    finally:
        if stream is not None:
            stream.close()


def run(case: Case, guard: tokenguard.Guard | None = None) -> tuple[Seen, Seen, tokenguard.Guard]:
    """``case`` answered to a bare SDK client and to a guarded one (settling in the caller's thread,
    under a budget): what each caller saw, and the guard."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(case.status, content=case.body, headers={"content-type": case.content_type})

    if guard is None:
        guard = tokenguard.Guard(
            store="memory://",
            retry=False,
            settle_delay_s=0,
            budgets=[Budget(limit_usd=10**12, period="total", alerts=())],
        )
    transport = httpx2.MockTransport(handler)
    if case.vendor == "openai":
        bare: Any = openai.OpenAI(
            api_key="sk-props", base_url=OAI_BASE, max_retries=0, http_client=httpx2.Client(transport=transport)
        )
        guarded: Any = tokenguard.OpenAI(
            api_key="sk-props", base_url=OAI_BASE, guard=guard, http_client=httpx2.Client(transport=transport)
        )
    else:
        bare = anthropic.Anthropic(
            api_key="sk-props", base_url=ANT_BASE, max_retries=0, http_client=httpx2.Client(transport=transport)
        )
        guarded = tokenguard.Anthropic(
            api_key="sk-props", base_url=ANT_BASE, guard=guard, http_client=httpx2.Client(transport=transport)
        )
    return invoke(bare, case), invoke(guarded, case), guard


def raised_inside_tokenguard(error: BaseException) -> bool:
    """Whether ``error`` was raised by tokenguard's own code (its innermost frame is in the package)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(TG_SOURCE)


def only_row(guard: tokenguard.Guard) -> tokenguard.LedgerRow:
    rows = list(guard.store.rows())
    assert len(rows) == 1, rows
    return rows[0]


def assert_accounted(case: Case, guard: tokenguard.Guard) -> tokenguard.LedgerRow:
    """The accounting promises for a call that reached the vendor and got a 200 answer."""
    row = only_row(guard)
    assert row.cost_usd is not None
    assert row.cost_usd >= 0, row
    assert all(n >= 0 for n in row.usage.counts()), row
    assert not (row.cost_usd == 0 and not row.estimated), f"a free call recorded as exact: {row}"
    status = guard.budget_status()[0]
    assert status.held_usd == 0
    assert status.spent_usd == from_nano(ceil_nano(row.cost_usd)) >= 0
    assert guard.spent() == row.cost_usd
    return row


@props(120)
@given(case=ALL_CASES)
def test_caller_gets_exactly_what_the_bare_sdk_gives(case: Case) -> None:
    """Whatever the answer — usage missing, null, negative, huge, of the wrong type, a stream without
    its usage chunk, with junk lines, cut short, junk bytes, another status — the guarded caller gets
    the very result or exception the bare SDK client gives for it, and never an error raised inside
    tokenguard."""
    bare, guarded, _ = run(case)
    if guarded.error is not None and not isinstance(guarded.error, TokenguardError):
        assert not raised_inside_tokenguard(guarded.error), repr(guarded.error)
    assert guarded.same_as(bare), (bare, guarded)


@props(100)
@given(case=sound_cases())
def test_every_answered_call_is_accounted_for_exactly_or_as_an_estimate(case: Case) -> None:
    """Every call that got a 200 answer leaves exactly one ledger row: priced, never negative, never a
    free call recorded as exact, its budget hold settled to exactly the row's cost; a row marked exact
    carries exactly the counts the answer reported, and an answer that reported no usage is an
    estimate (marked so)."""
    _, _, guard = run(case)
    row = assert_accounted(case, guard)
    if case.reported != "?":
        if not row.estimated:
            assert case.reported is not None, row
            assert (row.usage.input_tokens, row.usage.output_tokens) == case.reported, row
        if case.reported is None:
            assert row.estimated, row


@props(80)
@example(case=make_case("chat", {}))
@given(case=invalid_count_cases())
def test_usage_with_missing_or_broken_counts_is_an_estimate(case: Case) -> None:
    """A usage object whose input or output count is missing, null, negative or not an integer is
    not a report: the call is charged an estimate, marked ``estimated=True``."""
    # minimal falsifying example: a chat completion answered with "usage": {} -> cost 0, estimated=False
    bare, guarded, guard = run(case)
    assert guarded.same_as(bare)
    row = assert_accounted(case, guard)
    assert row.estimated, row


@props(60)
@example(
    case=make_case("chat", {"prompt_tokens": 1, "completion_tokens": 0, "prompt_tokens_details": {"cached_tokens": 3}})
)
@given(case=cache_heavy_cases())
def test_cache_counts_larger_than_the_prompt_never_make_a_negative_cost(case: Case) -> None:
    """Whatever cached-token count an answer reports, the call's recorded cost and the budget's
    settled spend are never negative."""
    # minimal falsifying example: prompt_tokens=1, cached_tokens=3 on gpt-4o -> cost_usd -0.00000125
    bare, guarded, guard = run(case)
    assert guarded.same_as(bare)
    assert_accounted(case, guard)


@props(30)
@example(case=make_case("messages", {"input_tokens": 1, "output_tokens": 0, "iterations": 1}))
@given(case=iteration_cases())
def test_a_malformed_iterations_field_still_leaves_one_ledger_row(case: Case) -> None:
    """An Anthropic answer whose ``usage.iterations`` is not a list is still recorded (one row, its
    hold settled)."""
    # minimal falsifying example: "usage": {"input_tokens": 1, "output_tokens": 0, "iterations": 1}
    bare, guarded, guard = run(case)
    assert guarded.same_as(bare)
    assert_accounted(case, guard)


IGNORED_BLOCKS = {
    "openai": [b": keep-alive\n\n", b":\n\n", b"\n\n"],
    "anthropic": [b": keep-alive\n\n", b":\n\n", b"\n\n", b'event: ping\ndata: {"type": "ping"}\n\n'],
}
COUNTS = st.tuples(st.integers(1, 10**6), st.integers(0, 10**6))


def clean_and_noisy(
    vendor: str, counts: tuple[int, int], noise: Callable[[list[bytes]], list[bytes]]
) -> tuple[Case, Case]:
    """A complete stream reporting ``counts`` exactly, and the same stream with ``noise`` applied to its blocks."""
    inp, out = counts
    if vendor == "openai":
        kind, usage, delta = "chat_stream", {"prompt_tokens": inp, "completion_tokens": out}, MISSING
        blocks = chat_blocks(usage)
    else:
        kind, usage, delta = "messages_stream", {"input_tokens": inp, "output_tokens": 1}, {"output_tokens": out}
        blocks = messages_blocks(usage, delta)
    clean = make_case(kind, usage, delta_usage=delta)
    return clean, make_case(kind, usage, delta_usage=delta, blocks=noise(list(blocks)))


def assert_same_accounting(clean: Case, noisy: Case) -> None:
    """The caller sees what the bare SDK gives for both, and both are recorded alike: the counts
    the stream reported, their cost, marked exact."""
    bare, clean_seen, clean_guard = run(clean)
    _, noisy_seen, noisy_guard = run(noisy)
    assert clean_seen.same_as(bare)
    assert noisy_seen.same_as(bare)
    clean_row, noisy_row = only_row(clean_guard), only_row(noisy_guard)
    assert (clean_row.usage.input_tokens, clean_row.usage.output_tokens) == clean.reported
    assert not clean_row.estimated
    assert (noisy_row.usage, noisy_row.cost_usd, noisy_row.estimated) == (
        clean_row.usage,
        clean_row.cost_usd,
        clean_row.estimated,
    )


@pytest.mark.parametrize(
    "vendor",
    [
        "openai",
        "anthropic",
    ],
)
@props(25)
@example(counts=(10, 5), leading=[0], middle=[])
@given(
    counts=COUNTS,
    leading=st.lists(st.integers(0, 3), min_size=1, max_size=3),
    middle=st.lists(st.tuples(st.integers(0, 10), st.integers(0, 3)), max_size=3),
)
def test_sse_blocks_before_the_first_event_do_not_change_the_accounting(
    vendor: str, counts: tuple[int, int], leading: list[int], middle: list[tuple[int, int]]
) -> None:
    """Keep-alive comments, empty events and (Anthropic) pings that the SDK ignores, before a
    stream's first event (and between its events, away from its last four), change neither what
    the caller gets nor what is recorded."""
    # minimal falsifying example (anthropic): ": keep-alive\n\n" before message_start, counts=(1, 0)
    # -> recorded input_tokens=0, cost 0, estimated=False
    choices = IGNORED_BLOCKS[vendor]

    def noise(blocks: list[bytes]) -> list[bytes]:
        for position, which in middle:  # after the first event, before the last four
            blocks.insert(1 + position % (len(blocks) - 4), choices[which % len(choices)])
        return [choices[i % len(choices)] for i in leading] + blocks

    assert_same_accounting(*clean_and_noisy(vendor, counts, noise))


@props(25)
@example(vendor="openai", counts=(10, 0), trailing=[0, 0, 0])
@given(
    vendor=st.sampled_from(["openai", "anthropic"]),
    counts=COUNTS,
    trailing=st.lists(st.integers(0, 3), min_size=1, max_size=6),
)
def test_sse_blocks_after_the_last_event_do_not_change_the_accounting(
    vendor: str, counts: tuple[int, int], trailing: list[int]
) -> None:
    """Keep-alive comments, empty events and (Anthropic) pings after a stream's terminal event
    change neither what the caller gets nor what is recorded."""
    # minimal falsifying example: an OpenAI chat stream reporting (10, 0), then 3 ": keep-alive" blocks
    # -> recorded (10, 6), estimated=True
    choices = IGNORED_BLOCKS[vendor]
    assert_same_accounting(
        *clean_and_noisy(vendor, counts, lambda b: b + [choices[i % len(choices)] for i in trailing])
    )
