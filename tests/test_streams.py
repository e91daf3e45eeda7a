"""Streams: abandoned, closed early, cut, broken or carrying no usage, every one is charged for
what it cost, and the caller sees exactly what the vendor sent."""

from __future__ import annotations

import gc
from typing import Any

import httpx2
import openai
import pytest
import tiktoken
import tiktoken.registry

import tokenguard
from tokenguard import _tokens
from tokenguard.testing import FakeLLM, Reply

MSGS = [{"role": "user", "content": "Tell me a short story about a lighthouse."}]
OA = "gpt-4o"
AN = "claude-haiku-4-5"


def only_row(guard: tokenguard.Guard) -> tokenguard.LedgerRow:
    rows = list(guard.store.rows())
    assert len(rows) == 1, rows
    return rows[0]


def assert_charged_incomplete(row: tokenguard.LedgerRow) -> None:
    assert row.outcome == "incomplete"
    assert row.error is None
    assert row.estimated is True
    assert row.stream is True
    assert row.cost_usd is not None
    assert row.cost_usd > 0
    assert row.usage.input_tokens > 0
    assert row.usage.output_tokens >= 1


def chat_stream(client: Any, **kw: Any) -> Any:
    return client.chat.completions.create(model=OA, messages=MSGS, stream=True, **kw)


def messages_stream(client: Any, **kw: Any) -> Any:
    return client.messages.create(model=AN, max_tokens=200, messages=MSGS, stream=True, **kw)


def first_text_chunk(stream: Any) -> Any:
    """Read an OpenAI chat stream up to (and including) its first chunk carrying text."""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return chunk
    raise AssertionError("the stream carried no text")


# -- 1. abandoned and closed streams (sync) ---------------------------------------------------------


def test_openai_stream_abandoned_after_first_chunk_charges_an_output_token(
    fake: FakeLLM, guard: tokenguard.Guard
) -> None:
    """A chat stream dropped after its first chunk is charged input and at least one output token."""
    stream = chat_stream(fake.openai(guard=guard))
    for _ in stream:
        break
    del stream
    gc.collect()
    assert_charged_incomplete(only_row(guard))


def test_openai_stream_abandoned_mid_text_is_charged(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """A chat stream dropped (break, del, gc) after its first text is recorded once as incomplete and charged."""
    stream = chat_stream(fake.openai(guard=guard))
    chunk = first_text_chunk(stream)
    assert chunk.choices[0].delta.content
    assert list(guard.store.rows()) == []
    del stream, chunk
    gc.collect()
    assert_charged_incomplete(only_row(guard))


@pytest.mark.parametrize("vendor", ["openai", "anthropic"])
def test_stream_dropped_unread_is_charged(fake: FakeLLM, guard: tokenguard.Guard, vendor: str) -> None:
    """A stream dropped (del, gc) before any chunk is read is still recorded and charged its input."""
    if vendor == "openai":
        stream = chat_stream(fake.openai(guard=guard))
    else:
        stream = messages_stream(fake.anthropic(guard=guard))
    del stream
    gc.collect()
    row = only_row(guard)
    assert (row.outcome, row.estimated, row.stream) == ("incomplete", True, True)
    assert row.usage.input_tokens > 0
    assert row.cost_usd is not None
    assert row.cost_usd > 0


def test_openai_stream_closed_after_one_chunk_is_charged(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """stream.close() after one chunk records one incomplete, charged row at once."""
    stream = chat_stream(fake.openai(guard=guard))
    next(iter(stream))
    stream.close()
    row = only_row(guard)
    assert row.outcome == "incomplete"
    assert row.estimated is True
    assert row.cost_usd is not None
    assert row.cost_usd > 0
    assert row.usage.input_tokens > 0
    del stream
    gc.collect()
    assert len(list(guard.store.rows())) == 1


def test_openai_stream_closed_after_text_is_charged(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """stream.close() after the first text chunk charges input and the output received."""
    stream = chat_stream(fake.openai(guard=guard))
    first_text_chunk(stream)
    stream.close()
    assert_charged_incomplete(only_row(guard))


def test_anthropic_stream_abandoned_is_charged(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """An Anthropic create(stream=True) dropped after one event keeps the reported input and is charged."""
    fake.reply(input_tokens=321, output_tokens=50)
    stream = messages_stream(fake.anthropic(guard=guard))
    for event in stream:
        assert event.type == "message_start"
        break
    del stream, event
    gc.collect()
    row = only_row(guard)
    assert_charged_incomplete(row)
    assert row.usage.input_tokens == 321


def test_anthropic_stream_closed_after_one_event_is_charged(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """An Anthropic stream closed after one event is recorded as incomplete and charged."""
    fake.reply(input_tokens=77, output_tokens=50)
    stream = messages_stream(fake.anthropic(guard=guard))
    next(iter(stream))
    stream.close()
    row = only_row(guard)
    assert_charged_incomplete(row)
    assert row.usage.input_tokens == 77


def test_anthropic_stream_helper_exited_early_is_charged(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """Leaving messages.stream() early records incomplete, with message_start's input kept as reported."""
    reply = Reply(input_tokens=1234, output_tokens=80, cache_read_tokens=200)
    fake.queue(reply)
    client = fake.anthropic(guard=guard)
    with client.messages.stream(model=AN, max_tokens=200, messages=MSGS) as stream:
        for _ in stream:
            break
    row = only_row(guard)
    assert_charged_incomplete(row)
    assert row.usage.input_tokens == reply.input_tokens
    assert row.usage.cache_read_tokens == reply.cache_read_tokens
    assert row.usage.output_tokens < reply.output_tokens


def test_fully_read_stream_is_recorded_once(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """A stream read to its end, then closed and collected, still has exactly one ok row."""
    stream = messages_stream(fake.anthropic(guard=guard))
    assert [e.type for e in stream][-1] == "message_stop"
    stream.close()
    del stream
    gc.collect()
    row = only_row(guard)
    assert (row.outcome, row.estimated) == ("ok", False)
    assert (row.usage.input_tokens, row.usage.output_tokens) == (9, 5)


# -- 2. async streams closed early ------------------------------------------------------------------


async def test_async_openai_stream_closed_early_is_charged(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """async for one chunk, then await stream.close(): one incomplete, charged row."""
    stream = await chat_stream(fake.openai(guard=guard, async_=True))
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        break
    await stream.close()
    row = only_row(guard)
    assert (row.outcome, row.estimated, row.stream) == ("incomplete", True, True)
    assert row.cost_usd is not None
    assert row.cost_usd > 0
    assert row.usage.input_tokens > 0


async def test_async_openai_stream_closed_after_text_is_charged(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """async stream closed after its first text chunk: one incomplete row charging input and output."""
    stream = await chat_stream(fake.openai(guard=guard, async_=True))
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    assert_charged_incomplete(only_row(guard))


async def test_async_anthropic_stream_closed_early_is_charged(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """Async Anthropic stream closed after one event: incomplete, input as reported, charged."""
    fake.reply(input_tokens=555, output_tokens=40)
    stream = await messages_stream(fake.anthropic(guard=guard, async_=True))
    async for event in stream:
        assert event.type == "message_start"
        break
    await stream.close()
    row = only_row(guard)
    assert_charged_incomplete(row)
    assert row.usage.input_tokens == 555


async def test_async_anthropic_stream_helper_exited_early_is_charged(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """Leaving an async messages.stream() early records an incomplete, charged row."""
    fake.reply(input_tokens=90, output_tokens=40)
    client = fake.anthropic(guard=guard, async_=True)
    async with client.messages.stream(model=AN, max_tokens=200, messages=MSGS) as stream:
        async for _ in stream:
            break
    row = only_row(guard)
    assert_charged_incomplete(row)
    assert row.usage.input_tokens == 90


# -- 3. streams the server cuts or breaks -----------------------------------------------------------


@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
async def test_openai_stream_cut_cleanly_is_incomplete(fake: FakeLLM, guard: tokenguard.Guard, async_: bool) -> None:
    """A chat stream the server ends early without [DONE] is recorded incomplete and estimated."""
    fake.reply(text="abcdefghijkl", stream_cut_after=3)
    client = fake.openai(guard=guard, async_=async_)
    chunks = [c async for c in await chat_stream(client)] if async_ else list(chat_stream(client))
    assert len(chunks) == 3
    row = only_row(guard)
    assert_charged_incomplete(row)
    assert row.usage.output_tokens == _tokens.count_tokens("abcdefgh", OA)


def test_anthropic_stream_cut_cleanly_is_incomplete(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """An Anthropic stream ended early without message_stop is recorded incomplete and estimated."""
    fake.reply(input_tokens=40, output_tokens=30, stream_cut_after=3)
    events = list(messages_stream(fake.anthropic(guard=guard)))
    assert len(events) == 3
    row = only_row(guard)
    assert_charged_incomplete(row)
    assert row.usage.input_tokens == 40


def _broken_stream_error(client: Any, stream_fn: Any) -> BaseException:
    with pytest.raises(Exception) as info:  # noqa: PT011 - the class is whatever the vendor raises
        for _ in stream_fn(client):
            pass
    return info.value


@pytest.mark.parametrize(
    ("vendor", "stream_fn"),
    [("openai", chat_stream), ("anthropic", messages_stream)],
    ids=["openai", "anthropic"],
)
def test_broken_stream_raises_the_vendors_error_unchanged(
    fake: FakeLLM, guard: tokenguard.Guard, vendor: str, stream_fn: Any
) -> None:
    """A stream whose connection breaks raises exactly what the unguarded SDK raises, not a tokenguard error."""
    fake.reply(stream_error_after=3).reply(stream_error_after=3)
    guarded = fake.openai(guard=guard) if vendor == "openai" else fake.anthropic(guard=guard)
    plain = fake.vendor_openai() if vendor == "openai" else fake.vendor_anthropic()
    ours = _broken_stream_error(guarded, stream_fn)
    theirs = _broken_stream_error(plain, stream_fn)
    assert type(ours) is type(theirs)
    assert isinstance(ours, openai.APIConnectionError | httpx2.RemoteProtocolError)
    assert not isinstance(ours, tokenguard.TokenguardError)
    assert str(ours) == str(theirs)


@pytest.mark.parametrize(
    ("vendor", "stream_fn"),
    [("openai", chat_stream), ("anthropic", messages_stream)],
    ids=["openai", "anthropic"],
)
def test_broken_stream_is_an_error_row_that_charges_the_output(
    fake: FakeLLM, guard: tokenguard.Guard, vendor: str, stream_fn: Any
) -> None:
    """A broken stream leaves one "error" row that still charges input and the output received."""
    fake.reply(stream_error_after=3)
    client = fake.openai(guard=guard) if vendor == "openai" else fake.anthropic(guard=guard)
    _broken_stream_error(client, stream_fn)
    row = only_row(guard)
    assert row.outcome == "error"
    assert row.error
    assert row.estimated is True
    assert row.cost_usd is not None
    assert row.cost_usd > 0
    assert row.usage.input_tokens > 0
    assert row.usage.output_tokens >= 1


async def test_async_broken_stream_is_an_error_row(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """A broken async chat stream raises the vendor's error and leaves one charged "error" row."""
    fake.reply(stream_error_after=3)
    stream = await chat_stream(fake.openai(guard=guard, async_=True))
    with pytest.raises(openai.APIConnectionError):
        async for _ in stream:
            pass
    row = only_row(guard)
    assert row.outcome == "error"
    assert row.cost_usd is not None
    assert row.cost_usd > 0


# -- 4. a chat stream without usage ---------------------------------------------------------------

TEXT = "The keeper lit the lamp at dusk."


def test_stream_without_usage_is_ok_and_estimated(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """A chat stream without include_usage that finishes is "ok", estimated, output counted from its text."""
    fake.reply(text=TEXT, output_tokens=999)
    chunks = list(chat_stream(fake.openai(guard=guard)))
    assert all(c.usage is None for c in chunks)
    row = only_row(guard)
    assert row.outcome == "ok"
    assert row.estimated is True
    assert row.usage.output_tokens == _tokens.count_tokens(TEXT, OA)
    assert row.usage.output_tokens != 999
    assert row.usage.input_tokens > 0
    assert row.cost_usd is not None
    assert row.cost_usd > 0


def test_tokenguard_never_injects_include_usage(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """The request body of a stream sent without stream_options carries none."""
    list(chat_stream(fake.openai(guard=guard)))
    body = fake.requests[-1].json
    assert body["stream"] is True
    assert "stream_options" not in body


def test_stream_with_usage_is_exact(fake: FakeLLM, guard: tokenguard.Guard) -> None:
    """A chat stream with include_usage records the server's counts, not an estimate."""
    fake.reply(text=TEXT, input_tokens=44, output_tokens=11)
    list(chat_stream(fake.openai(guard=guard), stream_options={"include_usage": True}))
    row = only_row(guard)
    assert (row.outcome, row.estimated) == ("ok", False)
    assert (row.usage.input_tokens, row.usage.output_tokens) == (44, 11)


@pytest.mark.parametrize("kw", [{}, {"stream_options": {"include_usage": True}}], ids=["no-usage", "usage"])
def test_guarded_stream_yields_the_same_chunks_as_the_vendor(
    fake: FakeLLM, guard: tokenguard.Guard, kw: dict[str, Any]
) -> None:
    """The chunks iterated through a guarded client equal those through an unguarded one."""
    fake.reply(text=TEXT).reply(text=TEXT)
    ours = [c.model_dump() for c in chat_stream(fake.openai(guard=guard), **kw)]
    theirs = [c.model_dump() for c in chat_stream(fake.vendor_openai(), **kw)]
    assert len(ours) == len(theirs) >= 4
    assert ours == theirs
    assert fake.requests[0].json == fake.requests[1].json


async def test_async_guarded_stream_yields_the_same_chunks_as_the_vendor(
    fake: FakeLLM, guard: tokenguard.Guard
) -> None:
    """The async chunks through a guarded client equal those through an unguarded one."""
    fake.reply(text=TEXT).reply(text=TEXT)
    ours = [c.model_dump() async for c in await chat_stream(fake.openai(guard=guard, async_=True))]
    theirs = [c.model_dump() async for c in await chat_stream(fake.vendor_openai(async_=True))]
    assert ours == theirs
    assert len(ours) >= 4


# -- 5. estimates with a real (tiny, offline) tiktoken encoding --------------------------------------


@pytest.fixture
def tiny_o200k(monkeypatch: pytest.MonkeyPatch) -> tiktoken.Encoding:
    """A tiny BPE encoding installed in memory as o200k_base (gpt-4o's encoding)."""
    _tokens._reset_for_tests()
    ranks = {bytes([i]): i for i in range(256)}
    for merged in (b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world"):
        ranks[merged] = len(ranks)
    enc = tiktoken.Encoding(
        "tg_test",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "o200k_base", enc)
    assert enc.encode_ordinary("hello world") == [ranks[b"hello"], ranks[b" world"]]
    return enc


def test_stream_estimate_uses_the_local_tiktoken_encoding(
    fake: FakeLLM, guard: tokenguard.Guard, tiny_o200k: tiktoken.Encoding
) -> None:
    """With a local o200k_base, "hello world" out is 2 tokens and one "hello world" message in is 2+3+3."""
    fake.reply(text="hello world", input_tokens=500, output_tokens=500)
    client = fake.openai(guard=guard)
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=OA, messages=[{"role": "user", "content": "hello world"}], stream=True
        )
        if c.choices
    )
    assert text == "hello world"
    row = only_row(guard)
    assert row.estimated is True
    assert row.usage.output_tokens == 2
    assert row.usage.input_tokens == 8
