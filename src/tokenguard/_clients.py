"""Guarded vendor clients: thin sync and async shells around the pipeline.

The choke point is the SDK base client's ``request()`` — the one method every call path
reaches: ``create``, ``.parse()``, ``.stream()``, ``beta``, ``with_raw_response`` and
``with_streaming_response`` all end in ``self._client.request(...)`` on the resource's
client — plus ``_process_response()``, where each successful HTTP response passes before
the SDK parses it. Overriding both on a *subclass* (rather than patching ``create`` on an
instance) means ``isinstance`` holds, ``copy()``/``with_options()`` (which build
``self.__class__(...)``) stay guarded, and no object the user owns is mutated. See
docs/architecture.md for why this seam and not a transport or anthropic middleware.

The vendor SDK's own retries are forced off (``max_retries=0``): tokenguard owns retrying.

This module imports no SDK: the vendor classes are in ``_openai_clients.py`` and
``_anthropic_clients.py``, so a program pays only for the SDK it uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import sys
import threading
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, TypeVar, cast

import httpx2

from ._cache import tenant_of
from ._errors import ConfigurationError
from ._guard import Guard, default_guard
from ._hot import HotPath, install, learning
from ._pipeline import Call, Pipeline
from ._retry import Attempts, CutTimeout, Verdict
from ._sdks import classes
from .providers import Adapter, AnthropicAdapter, OpenAIAdapter

__all__ = [
    "wrap",
]

log = logging.getLogger("tokenguard")

# the call whose HTTP response the SDK is processing in this thread / task
_ACTIVE: ContextVar[Call | None] = ContextVar("tokenguard_active_call", default=None)


def _adapter_for(client: object) -> Adapter:
    if isinstance(client, classes("AzureOpenAI", "AsyncAzureOpenAI")):
        return OpenAIAdapter("azure")
    if isinstance(client, classes("OpenAI", "AsyncOpenAI")):
        return OpenAIAdapter("openai")
    return AnthropicAdapter()


def _check_guard(guard: object) -> Guard | None:
    if guard is not None and not isinstance(guard, Guard):
        raise ConfigurationError("guard", guard, "must be a tokenguard.Guard (or None for the default guard)")
    return guard


def _given_headers(options: Any) -> dict[str, str]:
    """The per-call headers, without the SDK's placeholders for headers it will omit."""
    return {k: v for k, v in (options.headers or {}).items() if isinstance(v, str)}


def _body(options: Any) -> Any:
    """The JSON body the SDK will send: given fields and ``extra_body``, without placeholders."""
    body = options.json_data
    if not isinstance(body, dict):
        return body
    extra = getattr(options, "extra_json", None)
    if extra:
        body = {**body, **extra}
    unset = classes("Omit", "NotGiven")  # the SDKs' placeholders for arguments not given
    return {k: v for k, v in body.items() if not isinstance(v, unset)}


_MISSING_KEY = "<missing API key>"  # what openai's Azure client holds when it has no key
_PROCESS_TOKEN = secrets.token_hex(8)  # tells apart clients of different processes without credentials
_FLIGHT_WAIT_S = 120.0  # the longest an identical call waits for another's answer
_warned_max_retries = False


def _no_vendor_retries(kwargs: dict[str, Any]) -> None:
    """Force the SDK's own retries off (tokenguard retries); say so once if they were asked for."""
    global _warned_max_retries
    asked = kwargs.get("max_retries")
    if isinstance(asked, int) and asked > 0 and not _warned_max_retries:
        _warned_max_retries = True
        log.warning(
            "tokenguard: max_retries=%d is not used: a guarded client's SDK retries are off and "
            "tokenguard retries instead (Guard(retry=tokenguard.Retry(attempts=...)))",
            asked,
        )
    kwargs["max_retries"] = 0


def _nothing(*args: Any) -> None:
    return None


def _mark_retried(exc: BaseException, retrier: object) -> None:
    """Note on a vendor error that tokenguard's retry already had its go at it, so that a
    ``@guarded`` function around the call does not retry it again (attempts never multiply)."""
    if retrier is not None:
        with contextlib.suppress(Exception):
            exc._tokenguard_retried = True  # type: ignore[attr-defined]


class _GuardedBase:
    """What sync and async guarded clients share: the guard, the adapter, copies, cache replay."""

    _tg_guard: Guard | None
    _tg_adapter: Adapter
    _tg_hot: HotPath

    def _tg_setup(self, guard: Guard | None) -> None:
        self._tg_guard = guard
        self._tg_adapter = _adapter_for(self)
        self._tg_hot = HotPath()
        self._tg_cuts: dict[tuple[int, int], CutTimeout] = {}

    @property
    def guard(self) -> Guard:
        """The guard this client reports to (the process default if none was given)."""
        return self._tg_guard if self._tg_guard is not None else default_guard()

    def copy(self, *args: Any, **kwargs: Any) -> Any:
        """The vendor's ``copy()``, keeping this client's guard (vendor retries stay off)."""
        _no_vendor_retries(kwargs)
        new = super().copy(*args, **kwargs)  # type: ignore[misc]
        new._tg_guard = self._tg_guard
        return new

    with_options = copy

    def _tg_providers(self) -> bool:
        """Whether a credential comes from a provider called per request (openai's
        ``api_key=callable``, Azure's ``azure_ad_token_provider``): the key is known only then."""
        return getattr(self, "_api_key_provider", None) is not None or self._tg_token_provider()

    def _tg_token_provider(self) -> bool:
        """Whether an Azure AD token comes from ``azure_ad_token_provider`` (no fixed token)."""
        return (
            getattr(self, "_azure_ad_token_provider", None) is not None
            and getattr(self, "_azure_ad_token", None) is None
        )

    def _tg_fresh_credentials(self) -> dict[str, str]:
        """The credentials this request will carry, asked from the providers as the SDK asks."""
        fresh: dict[str, str] = {}
        if getattr(self, "_api_key_provider", None) is not None:
            fresh["api_key"] = self._refresh_api_key()  # type: ignore[attr-defined]
        if self._tg_token_provider():
            fresh["_azure_ad_token"] = self._get_azure_ad_token() or ""  # type: ignore[attr-defined]
        return fresh

    async def _tg_fresh_credentials_async(self) -> dict[str, str]:
        """``_tg_fresh_credentials`` for the async clients, whose providers are awaited."""
        fresh: dict[str, str] = {}
        if getattr(self, "_api_key_provider", None) is not None:
            fresh["api_key"] = await self._refresh_api_key()  # type: ignore[attr-defined]
        if self._tg_token_provider():
            fresh["_azure_ad_token"] = await self._get_azure_ad_token() or ""  # type: ignore[attr-defined]
        return fresh

    def _tg_client_context(
        self, fresh: Mapping[str, str] | None = None
    ) -> tuple[str, str, dict[str, str], dict[str, Any]]:
        """What the cache key needs from the client itself: base URL, a credential fingerprint,
        default headers, default query parameters. ``fresh``: credentials just asked from the
        client's providers. A client whose credentials cannot be read at all is a tenant of its
        own (never sharing answers with another client it cannot be told apart from)."""
        secrets = []
        for name in ("api_key", "auth_token", "organization", "project", "_azure_ad_token"):
            value = (fresh or {}).get(name, getattr(self, name, None))
            secrets.append(value if isinstance(value, str) and value != _MISSING_KEY else "")
        api_key, auth_token, _, _, ad_token = secrets
        if not (api_key or auth_token or ad_token):
            secrets.append(f"unidentified client {_PROCESS_TOKEN} {id(self)}")
        custom = getattr(self, "_custom_headers", None) or {}
        headers = {k.lower(): v for k, v in custom.items() if isinstance(v, str)}
        query = dict(getattr(self, "_custom_query", None) or {})
        return str(getattr(self, "base_url", "")), tenant_of(*secrets), headers, query

    def _tg_cache_context(
        self, options: Any, fresh: Mapping[str, str] | None = None
    ) -> tuple[str, str, dict[str, str], dict[str, Any]]:
        """What the cache key needs from the client and this request's options (per-call
        headers and query parameters win over the client's)."""
        base_url, tenant, headers, query = self._tg_client_context(fresh)
        headers.update({k.lower(): v for k, v in _given_headers(options).items()})
        query.update(options.params or {})
        return base_url, tenant, headers, query

    def _tg_circuit(self, pipeline: Pipeline) -> str | None:
        """The base URL that names this client's circuits, when the guard breaks circuits."""
        return str(getattr(self, "base_url", "")) if pipeline.retrier and pipeline.retrier.breaks else None

    def _tg_attempts(self, pipeline: Pipeline, call: Call | None, options: Any) -> Attempts:
        """The retry hooks of one call. (Neither SDK sends an idempotency key, so there is none
        to keep the same across attempts.)"""
        vendor = self._tg_adapter.vendor
        # the base URL names a circuit breaker's target: only worked out when there is one
        base_url = str(getattr(self, "base_url", "")) if pipeline.retrier and pipeline.retrier.breaks else ""
        replayable = options.files is None
        if call is None:
            return Attempts(vendor, base_url, "", str(options.url), _nothing, _nothing, replayable)

        def before_attempt(number: int, left: float | None) -> None:
            if number > 1:
                pipeline.readmit(call)

        def after_failure(exc: BaseException, verdict: Verdict) -> None:
            pipeline.retrying(call, billed=verdict.billed)

        return Attempts(vendor, base_url, call.model, call.endpoint.name, before_attempt, after_failure, replayable)

    def _tg_attempt_options(self, options: Any, number: int, left: float | None) -> Any:
        """This attempt's options (a copy when anything changes: the SDK keeps the options it
        was given on what it returns, a page for one):

        - no SDK retries, even when the request itself asks for some (``max_retries``);
        - the retry count, in the header the SDK uses for it;
        - HTTP timeouts no longer than what the deadline leaves (and a timeout cut for an
          earlier call, found on a page's options, back to its original).
        """
        given = options.timeout
        retries = options.max_retries
        stray_retries = isinstance(retries, int) and retries != 0
        if left is None and number == 1 and not stray_retries and not isinstance(given, CutTimeout):
            return options
        options = options.model_copy()
        if stray_retries:
            options.max_retries = 0
        original = given.original if isinstance(given, CutTimeout) else given
        if left is not None:
            usable = isinstance(original, float | int | httpx2.Timeout) or original is None
            options.timeout = self._tg_cut(original if usable else self.timeout, left)  # type: ignore[attr-defined]
        elif isinstance(given, CutTimeout):
            options.timeout = original
        if number > 1:
            headers = dict(options.headers) if isinstance(options.headers, dict) else {}
            headers["x-stainless-retry-count"] = str(number - 1)
            options.headers = headers
        return options

    def _tg_cut(self, timeout: Any, left: float) -> CutTimeout:
        """``timeout`` cut to ``left`` seconds. Cut timeouts are reused per whole second left
        (rounded down, so never longer than what is left): most calls are first attempts with
        the whole deadline ahead, and build none."""
        second = math.floor(left)
        if second < 1:
            return CutTimeout(timeout, left)
        key = (id(timeout), second)
        cuts = self._tg_cuts
        cut = cuts.get(key)
        if cut is None or cut.original is not timeout:
            if len(cuts) > 64:
                cuts.clear()
            cut = cuts[key] = CutTimeout(timeout, float(second))
        return cut

    def _tg_replay_response(self, call: Call, options: Any) -> httpx2.Response:
        """The stored answer as an HTTP response to this very request (so raw-response and
        stream callers get exactly what a live answer would give them)."""
        entry = call.cache_entry
        assert entry is not None
        taught = learning.get()
        if taught is not None and not call.stream:  # the hot path may answer the next repeat
            taught.call = call
        # the SDK reads only the method, URL and its own marker headers (raw / streamed response)
        # of the request behind a response: a light one will do, no body, no auth
        headers = _given_headers(options)
        url = str(getattr(self, "base_url", "")).rstrip("/") + "/" + str(options.url).lstrip("/")
        request = httpx2.Request(str(options.method).upper(), url, headers=headers)
        self.guard.pipeline.record_hit(call)
        return httpx2.Response(
            entry.status,
            headers={"content-type": entry.content_type, "x-tokenguard-cache": "hit"},
            content=entry.body,
            request=request,
        )


class _SyncGuarded(_GuardedBase):
    def __init__(self, *args: Any, guard: Guard | None = None, **kwargs: Any) -> None:
        _no_vendor_retries(kwargs)
        super().__init__(*args, **kwargs)
        self._tg_setup(_check_guard(guard))

    def request(self, cast_to: Any, options: Any, *, stream: bool = False, stream_cls: Any = None) -> Any:
        """Run one logical call through the guard (the SDK calls this for every request)."""
        pipeline = self.guard.pipeline
        context = None
        if pipeline.cache is not None:
            fresh = self._tg_fresh_credentials() if self._tg_providers() else None
            context = lambda: self._tg_cache_context(options, fresh)  # noqa: E731
        call = pipeline.begin(
            self._tg_adapter, options.method, options.url, _body(options), stream, context, self._tg_circuit(pipeline)
        )
        parent = super()
        retrier = pipeline.retrier
        if call is None:  # costs nothing: retried, not accounted
            if retrier is None:
                options = self._tg_attempt_options(options, 1, None)
                return parent.request(cast_to, options, stream=stream, stream_cls=stream_cls)  # type: ignore[attr-defined]
            attempts = self._tg_attempts(pipeline, None, options)
            return retrier.run(
                attempts,
                lambda number, left: parent.request(  # type: ignore[attr-defined]
                    cast_to, self._tg_attempt_options(options, number, left), stream=stream, stream_cls=stream_cls
                ),
            )
        while call.waiting is not None:  # an identical call is in flight: its answer will be ours
            landed = call.waiting.wait(_FLIGHT_WAIT_S)
            call = pipeline.resume(call, gave_up=not landed)
        if call.cache_entry is not None:
            response = self._tg_replay_response(call, options)
            return parent._process_response(  # type: ignore[attr-defined]
                cast_to=self._maybe_override_cast_to(cast_to, options),  # type: ignore[attr-defined]
                options=options,
                response=response,
                stream=stream,
                stream_cls=stream_cls,
                retries_taken=0,
            )
        token = _ACTIVE.set(call)
        try:
            if retrier is None:
                pipeline.sending(call)
                options = self._tg_attempt_options(options, 1, None)
                return parent.request(cast_to, options, stream=stream, stream_cls=stream_cls)  # type: ignore[attr-defined]
            attempts = self._tg_attempts(pipeline, call, options)

            def send(number: int, left: float | None) -> Any:
                pipeline.sending(call)
                return parent.request(  # type: ignore[attr-defined]
                    cast_to, self._tg_attempt_options(options, number, left), stream=stream, stream_cls=stream_cls
                )

            return retrier.run(attempts, send)
        except BaseException as exc:
            pipeline.failed(call, exc)
            _mark_retried(exc, retrier)
            raise
        finally:
            _ACTIVE.reset(token)

    def _process_response(self, **kwargs: Any) -> Any:
        call = _ACTIVE.get()
        response = kwargs["response"]
        if call is None or not response.is_success:
            return super()._process_response(**kwargs)  # type: ignore[misc]
        pipeline = self.guard.pipeline
        if not response.is_stream_consumed:  # a stream: tap it before the SDK starts reading
            pipeline.observe(call, response, is_async=False)
            return super()._process_response(**kwargs)  # type: ignore[misc]
        try:
            result = super()._process_response(**kwargs)  # type: ignore[misc]
        except BaseException:
            pipeline.observe(call, response, is_async=False)  # billed all the same: settle from the bytes
            raise
        pipeline.observe(call, response, is_async=False, parsed=result)
        return result


class _AsyncGuarded(_GuardedBase):
    def __init__(self, *args: Any, guard: Guard | None = None, **kwargs: Any) -> None:
        _no_vendor_retries(kwargs)
        super().__init__(*args, **kwargs)
        self._tg_setup(_check_guard(guard))

    async def request(self, cast_to: Any, options: Any, *, stream: bool = False, stream_cls: Any = None) -> Any:
        """Run one logical call through the guard (the SDK awaits this for every request)."""
        pipeline = self.guard.pipeline
        context = None
        if pipeline.cache is not None:
            fresh = await self._tg_fresh_credentials_async() if self._tg_providers() else None
            context = lambda: self._tg_cache_context(options, fresh)  # noqa: E731
        begin = functools.partial(
            pipeline.begin,
            self._tg_adapter,
            options.method,
            options.url,
            _body(options),
            stream,
            context,
            self._tg_circuit(pipeline),
        )
        call = await asyncio.to_thread(begin) if pipeline.remote else begin()
        parent = super()
        retrier = pipeline.retrier
        if call is None:  # costs nothing: retried, not accounted
            if retrier is None:
                options = self._tg_attempt_options(options, 1, None)
                return await parent.request(cast_to, options, stream=stream, stream_cls=stream_cls)  # type: ignore[attr-defined]
            attempts = self._tg_attempts(pipeline, None, options)
            return await retrier.run_async(
                attempts,
                lambda number, left: parent.request(  # type: ignore[attr-defined]
                    cast_to, self._tg_attempt_options(options, number, left), stream=stream, stream_cls=stream_cls
                ),
            )
        while call.waiting is not None:  # an identical call is in flight: its answer will be ours
            landed = await asyncio.to_thread(call.waiting.wait, _FLIGHT_WAIT_S)
            if pipeline.remote:
                call = await asyncio.to_thread(pipeline.resume, call, gave_up=not landed)
            else:
                call = pipeline.resume(call, gave_up=not landed)
        if call.cache_entry is not None:
            response = self._tg_replay_response(call, options)
            return await parent._process_response(  # type: ignore[attr-defined]
                cast_to=self._maybe_override_cast_to(cast_to, options),  # type: ignore[attr-defined]
                options=options,
                response=response,
                stream=stream,
                stream_cls=stream_cls,
                retries_taken=0,
            )
        token = _ACTIVE.set(call)
        try:
            if retrier is None:
                pipeline.sending(call)
                options = self._tg_attempt_options(options, 1, None)
                return await parent.request(cast_to, options, stream=stream, stream_cls=stream_cls)  # type: ignore[attr-defined]
            attempts = self._tg_attempts(pipeline, call, options)

            async def send(number: int, left: float | None) -> Any:
                pipeline.sending(call)
                return await parent.request(  # type: ignore[attr-defined]
                    cast_to, self._tg_attempt_options(options, number, left), stream=stream, stream_cls=stream_cls
                )

            return await retrier.run_async(attempts, send)
        except BaseException as exc:
            pipeline.failed(call, exc)
            _mark_retried(exc, retrier)
            raise
        finally:
            _ACTIVE.reset(token)

    async def _process_response(self, **kwargs: Any) -> Any:
        call = _ACTIVE.get()
        response = kwargs["response"]
        if call is None or not response.is_success:
            return await super()._process_response(**kwargs)  # type: ignore[misc]
        pipeline = self.guard.pipeline
        if not response.is_stream_consumed:  # a stream: tap it before the SDK starts reading
            pipeline.observe(call, response, is_async=True)
            return await super()._process_response(**kwargs)  # type: ignore[misc]
        try:
            result = await super()._process_response(**kwargs)  # type: ignore[misc]
        except BaseException:
            pipeline.observe(call, response, is_async=True)  # billed all the same: settle from the bytes
            raise
        pipeline.observe(call, response, is_async=True, parsed=result)
        return result


class _OpenAIResources:
    """The hot path (``_hot.py``) in front of the plain ``create`` methods of an OpenAI client."""

    @functools.cached_property
    def chat(self) -> Any:
        chat = super().chat  # type: ignore[misc]
        install(self, chat.completions, "chat.completions.create", "chat.completions", is_async=_is_async(self))
        return chat

    @functools.cached_property
    def responses(self) -> Any:
        responses = super().responses  # type: ignore[misc]
        install(self, responses, "responses.create", "responses", is_async=_is_async(self))
        return responses

    @functools.cached_property
    def completions(self) -> Any:
        completions = super().completions  # type: ignore[misc]
        install(self, completions, "completions.create", "completions", is_async=_is_async(self))
        return completions

    @functools.cached_property
    def embeddings(self) -> Any:
        embeddings = super().embeddings  # type: ignore[misc]
        install(self, embeddings, "embeddings.create", "embeddings", is_async=_is_async(self))
        return embeddings


class _AnthropicResources:
    """The hot path (``_hot.py``) in front of ``messages.create`` of an Anthropic client."""

    @functools.cached_property
    def messages(self) -> Any:
        messages = super().messages  # type: ignore[misc]
        install(self, messages, "messages.create", "messages", is_async=_is_async(self))
        return messages


def _is_async(client: object) -> bool:
    return isinstance(client, _AsyncGuarded)


# the guarded class of each vendor class (filled by _openai_clients / _anthropic_clients)
_NAMED: dict[type, type] = {}
_derived: dict[type, type] = {}
_derived_lock = threading.Lock()

_C = TypeVar("_C")


def _guarded_class(cls: type) -> type:
    if issubclass(cls, _GuardedBase):
        return cls
    # the guarded classes of every SDK that is loaded (a client's SDK is)
    if "openai" in sys.modules:
        from . import _openai_clients  # noqa: F401
    if "anthropic" in sys.modules:
        from . import _anthropic_clients  # noqa: F401
    named = _NAMED.get(cls)
    if named is not None:
        return named
    with _derived_lock:
        derived = _derived.get(cls)
        if derived is None:
            if issubclass(cls, classes("AsyncOpenAI", "AsyncAnthropic")):
                shell: type = _AsyncGuarded
            elif issubclass(cls, classes("OpenAI", "Anthropic")):
                shell = _SyncGuarded
            else:
                raise ConfigurationError(
                    "client",
                    cls.__name__,
                    "tokenguard.wrap() takes an openai.OpenAI/AsyncOpenAI/AzureOpenAI/AsyncAzureOpenAI "
                    "or anthropic.Anthropic/AsyncAnthropic client (or a subclass)",
                )
            openai_sdk = sys.modules.get("openai")
            resources = (
                _OpenAIResources
                if openai_sdk is not None and issubclass(cls, openai_sdk.OpenAI | openai_sdk.AsyncOpenAI)
                else _AnthropicResources
            )
            derived = type(f"Guarded{cls.__name__}", (shell, resources, cls), {"__module__": __name__})
            _derived[cls] = derived
        return derived


def wrap(client: _C, *, guard: Guard | None = None) -> _C:
    """A guarded copy of an existing vendor client: ``isinstance(wrap(c), type(c))`` holds.

    The copy shares the original's HTTP connection pool and settings (key, base URL,
    timeouts, headers, ``http_client``); the original is left untouched and unguarded.
    """
    guard = _check_guard(guard)
    mock = sys.modules.get("unittest.mock")  # a mock exists only if its module was imported
    if mock is not None and isinstance(client, mock.NonCallableMock):
        raise ConfigurationError(
            "client",
            type(client).__name__,
            "a unittest.mock object cannot be guarded (it sends no HTTP request for tokenguard to see); "
            "test with tokenguard.testing.FakeLLM or the tokenguard pytest fixtures (docs/testing.md)",
        )
    cls = _guarded_class(type(client))
    if isinstance(client, _GuardedBase):
        new = client.copy()
    else:
        # let the vendor's own copy() rebuild the client, as an instance of the guarded class
        shell: Any = object.__new__(cls)
        shell.__dict__.update(client.__dict__)
        shell._tg_guard = None
        new = shell.copy()
    new._tg_guard = guard if guard is not None else cast(_GuardedBase, client).__dict__.get("_tg_guard")
    return cast(_C, new)
