"""``_sse.iter_sse``: splitting a server-sent-events body into ``(event, data)`` pairs."""

from __future__ import annotations

import json

from tokenguard._sse import iter_sse


def events(body: bytes) -> list[tuple[str | None, str]]:
    return list(iter_sse(body))


def test_empty_body_has_no_events() -> None:
    """An empty body yields nothing."""
    assert events(b"") == []


def test_blank_lines_only_have_no_events() -> None:
    """A body of blank lines yields nothing."""
    assert events(b"\n\n\r\n\n") == []


def test_data_only_events_have_no_name() -> None:
    """Events without an ``event:`` line come back with the name None."""
    body = b'data: {"a": 1}\n\ndata: [DONE]\n\n'
    assert events(body) == [(None, '{"a": 1}'), (None, "[DONE]")]


def test_named_events() -> None:
    """An ``event:`` line names the event it belongs to, and the name does not carry over to the next one."""
    body = b'event: message_start\ndata: {"x": 1}\n\nevent: ping\ndata: {}\n\ndata: plain\n\n'
    assert events(body) == [("message_start", '{"x": 1}'), ("ping", "{}"), (None, "plain")]


def test_event_line_after_data_still_names_the_event() -> None:
    """Field order inside an event does not matter."""
    assert events(b"data: d\nevent: late\n\n") == [("late", "d")]


def test_multi_line_data_is_joined_with_newlines() -> None:
    """Several ``data:`` lines of one event are joined with a newline."""
    body = b"event: e\ndata: one\ndata: two\ndata: three\n\n"
    assert events(body) == [("e", "one\ntwo\nthree")]


def test_comments_are_ignored() -> None:
    """Lines starting with ':' are comments (keep-alives) and are skipped."""
    body = b": keep-alive\n\ndata: a\n: inside an event\ndata: b\n\n:\n\n"
    assert events(body) == [(None, "a\nb")]


def test_crlf_line_endings() -> None:
    """CRLF line endings work like LF."""
    body = b"event: x\r\ndata: one\r\ndata: two\r\n\r\ndata: three\r\n\r\n"
    assert events(body) == [("x", "one\ntwo"), (None, "three")]


def test_cr_line_endings() -> None:
    """Bare CR line endings (allowed by the SSE spec) work like LF."""
    body = b"data: one\r\rdata: two\r\r"
    assert events(body) == [(None, "one"), (None, "two")]


def test_trailing_event_without_blank_line_is_returned() -> None:
    """A body cut off after an event's data, before its blank line, still yields that event."""
    body = b"data: first\n\nevent: last\ndata: partial"
    assert events(body) == [(None, "first"), ("last", "partial")]


def test_event_without_data_is_not_dispatched() -> None:
    """An event with only an ``event:`` line and no data yields nothing, and its name does not leak on."""
    body = b"event: lonely\n\ndata: next\n\nevent: tail\n"
    assert events(body) == [(None, "next")]


def test_only_one_leading_space_is_stripped() -> None:
    """The single space after the colon is removed; further spaces and no-space values are kept."""
    body = b"data:no-space\n\ndata:  two-spaces\n\ndata: trailing \n\n"
    assert events(body) == [(None, "no-space"), (None, " two-spaces"), (None, "trailing ")]


def test_colons_inside_data_are_kept() -> None:
    """Only the first colon separates the field name; the rest belongs to the value."""
    assert events(b'data: {"url": "https://x"}\n\n') == [(None, '{"url": "https://x"}')]


def test_unknown_fields_are_ignored() -> None:
    """id:, retry: and unknown fields do not change the data or name."""
    body = b"id: 7\nretry: 100\nfoo: bar\ndata: d\n\n"
    assert events(body) == [(None, "d")]


def test_field_without_colon_is_an_empty_value() -> None:
    """A bare ``data`` line adds an empty data line (SSE spec: the whole line is the field name)."""
    assert events(b"data\ndata: x\n\n") == [(None, "\nx")]


def test_utf8_payload_is_decoded() -> None:
    """Non-ASCII UTF-8 data is decoded to text."""
    assert events('data: {"t": "héllo 世界"}\n\n'.encode()) == [(None, '{"t": "héllo 世界"}')]


def test_unicode_line_separators_inside_data_are_not_line_breaks() -> None:
    """Only CR, LF and CRLF end lines: raw U+2028 / U+2029 / U+0085 (legal inside JSON strings) stay in the data."""
    text = '{"t": "a\u2028b\u2029c\x85d"}'
    got = events(f"data: {text}\n\n".encode())
    assert got == [(None, text)]
    assert json.loads(got[0][1]) == {"t": "a\u2028b\u2029c\x85d"}


def test_other_control_characters_inside_data_are_not_line_breaks() -> None:
    """Form feed, vertical tab and the \\x1c-\\x1e separators are not SSE line endings either."""
    text = "a\x0cb\x0bc\x1cd\x1de\x1ef"
    assert events(f"data: {text}\n\n".encode()) == [(None, text)]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    """Bytes that are not UTF-8 are replaced rather than failing the whole body."""
    assert events(b"data: a\xffb\n\n") == [(None, "a\ufffdb")]


def test_head_and_tail_keeps_the_first_and_last_events() -> None:
    """A long stream is read only at its ends: the first event and the last four."""
    from tokenguard._sse import head_and_tail

    body = b"".join(f"data: {i}\n\n".encode() for i in range(50))
    assert head_and_tail(body) == [(None, "0"), (None, "46"), (None, "47"), (None, "48"), (None, "49")]


def test_head_and_tail_reads_short_or_cr_streams_whole() -> None:
    """Streams with no middle, or with CR line endings, are read whole."""
    from tokenguard._sse import head_and_tail, iter_sse

    short = b"event: a\ndata: 1\n\ndata: 2\n\ndata: 3\n\n"
    crlf = b"".join(f"data: {i}\r\n\r\n".encode() for i in range(20))
    assert head_and_tail(short) == list(iter_sse(short))
    assert head_and_tail(crlf) == list(iter_sse(crlf))


def test_head_and_tail_keeps_an_unterminated_last_event() -> None:
    """A stream cut off mid-event still yields that last, partial event."""
    from tokenguard._sse import head_and_tail

    body = b"".join(f"data: {i}\n\n".encode() for i in range(20)) + b"data: cut"
    assert head_and_tail(body)[-1] == (None, "cut")
