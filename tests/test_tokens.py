"""``_tokens``: exact counts from an in-memory or genuine cached tiktoken encoding, else an estimate; no download."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from tokenguard import _tokens
from tokenguard._tokens import count_messages_tokens, count_tokens, estimate_tokens, tiktoken_encoding

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"


def _small_encoding() -> tiktoken.Encoding:
    ranks = {bytes([i]): i for i in range(256)}
    for m in (b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world"):
        ranks[m] = len(ranks)
    return tiktoken.Encoding(
        "tg_test",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )


@pytest.fixture(autouse=True)
def _fresh_decisions() -> Iterator[None]:
    """Every test starts and ends with no remembered encoding decisions."""
    _tokens._reset_for_tests()
    yield
    _tokens._reset_for_tests()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No o200k_base in memory, an empty tiktoken cache dir, and any download or socket connect fails the test."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    for name in ("o200k_base", "cl100k_base"):
        monkeypatch.delitem(tiktoken.registry.ENCODINGS, name, raising=False)

    def no_download(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    def no_connect(self: socket.socket, address: object) -> None:
        raise AssertionError(f"a socket tried to connect to {address!r}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    return cache


@pytest.fixture
def small_o200k(monkeypatch: pytest.MonkeyPatch) -> tiktoken.Encoding:
    """The small offline encoding, registered in memory as o200k_base."""
    enc = _small_encoding()
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "o200k_base", enc)
    return enc


def test_small_encoding_is_what_the_tests_assume() -> None:
    """The test encoding splits "hello world" into exactly two tokens."""
    assert _small_encoding().encode("hello world") == [
        _small_encoding().encode_single_token(b"hello"),
        _small_encoding().encode_single_token(b" world"),
    ]


def test_in_memory_encoding_gives_exact_count(small_o200k: tiktoken.Encoding) -> None:
    """An encoding already in tiktoken's registry is used for an OpenAI model: "hello world" is 2 tokens."""
    assert tiktoken_encoding("gpt-4o") is small_o200k
    assert count_tokens("hello world", "gpt-4o") == 2
    # differs from the estimate, so the exact path was really taken
    assert estimate_tokens("hello world") == 3


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4o-mini", "gpt-5", "o3", "gpt-4.1"])
def test_every_o200k_model_uses_the_in_memory_encoding(small_o200k: tiktoken.Encoding, model: str) -> None:
    """OpenAI models whose encoding is o200k_base all count with the in-memory encoding."""
    assert count_tokens("hello world", model) == 2


def test_special_token_text_is_counted_as_ordinary_text(small_o200k: tiktoken.Encoding) -> None:
    """Text that looks like a special token is counted as plain text, never raising."""
    assert count_tokens("<|endoftext|>", "gpt-4o") == len(small_o200k.encode_ordinary("<|endoftext|>"))
    assert count_tokens("<|endoftext|>", "gpt-4o") > 1


def test_empty_text_is_zero_tokens(small_o200k: tiktoken.Encoding) -> None:
    """Empty text counts as zero tokens with or without an encoding."""
    assert count_tokens("", "gpt-4o") == 0
    assert count_tokens("", "claude-sonnet-4-5") == 0


def test_no_encoding_available_falls_back_without_network(offline: Path) -> None:
    """With no encoding in memory and an empty cache, there is no encoding, no download, and counts are estimates."""
    assert tiktoken_encoding("gpt-4o") is None
    assert count_tokens("hello world", "gpt-4o") == estimate_tokens("hello world") == 3
    assert count_tokens("hello world " * 10, "gpt-5") == estimate_tokens("hello world " * 10)
    assert tiktoken_encoding("text-embedding-3-small") is None  # cl100k_base
    assert "o200k_base" not in tiktoken.registry.ENCODINGS
    assert list(offline.iterdir()) == []


def test_corrupted_cache_file_is_not_used_or_deleted(offline: Path) -> None:
    """A cache file whose sha256 is wrong is ignored (no encoding, no download) and left where it is."""
    path = offline / hashlib.sha1(O200K_URL.encode()).hexdigest()
    path.write_bytes(b"aGVsbG8= 0\nnot a real encoding file\n")
    before = path.read_bytes()

    assert tiktoken_encoding("gpt-4o") is None
    assert count_tokens("hello world", "gpt-4o") == 3
    assert path.exists()
    assert path.read_bytes() == before


def test_cache_dir_falls_back_like_tiktoken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The cache directory is looked up exactly where tiktoken looks: TIKTOKEN_CACHE_DIR, then DATA_GYM_CACHE_DIR."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "b"))
    assert _tokens._cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    assert _tokens._cache_dir() == str(tmp_path / "b")
    monkeypatch.delenv("DATA_GYM_CACHE_DIR")
    assert os.path.basename(_tokens._cache_dir()) == "data-gym-cache"


def test_empty_cache_dir_setting_means_no_encoding(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TIKTOKEN_CACHE_DIR="" (tiktoken's "no cache": always download) gives no encoding and no download."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert tiktoken_encoding("gpt-4o") is None
    assert count_tokens("hello", "gpt-4o") == 2


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-6", "claude-3-5-sonnet"])
def test_claude_models_always_estimate(small_o200k: tiktoken.Encoding, model: str) -> None:
    """Claude models have no public tokenizer: the estimate is used even when an o200k encoding is in memory."""
    assert tiktoken_encoding(model) is None
    assert count_tokens("hello world", model) == estimate_tokens("hello world") == 3


def test_unknown_model_estimates(small_o200k: tiktoken.Encoding) -> None:
    """A model tiktoken does not know is estimated."""
    assert tiktoken_encoding("my-private-llama") is None
    assert count_tokens("hello world", "my-private-llama") == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("a", 1),
        ("abcd", 1),
        ("abcde", 2),
        ("abcdefgh", 2),
        ("abcdefghi", 3),
        ("日本語", 3),
        ("世界 hi", 2 + 1),  # 3 ASCII chars -> 1, 2 CJK chars -> 2
        ("héllo", 1 + 1),  # 4 ASCII -> 1, é -> 1
        ("😀", 1),
    ],
)
def test_estimate_tokens(text: str, expected: int) -> None:
    """The estimate is ceil(ASCII chars / 4) plus one token per non-ASCII character."""
    assert estimate_tokens(text) == expected


def test_estimate_is_generous_for_cjk() -> None:
    """Every CJK character is counted as a whole token."""
    assert estimate_tokens("漢" * 1000) == 1000


def test_count_messages_adds_framing(small_o200k: tiktoken.Encoding) -> None:
    """Chat input is the texts' tokens plus 3 per message plus 3 for the reply priming."""
    assert count_messages_tokens(["hello world", "hello"], "gpt-4o", messages=2) == (2 + 1) + 3 * 2 + 3
    assert count_messages_tokens(["hello world"], "gpt-4o", messages=5) == 2 + 15 + 3


def test_count_messages_estimates_for_claude() -> None:
    """For Claude the message texts are estimated and the same framing is added."""
    assert count_messages_tokens(["abcdefgh", "日本"], "claude-sonnet-4-5", messages=1) == (2 + 2) + 3 + 3


def test_count_messages_without_messages_has_no_framing(small_o200k: tiktoken.Encoding) -> None:
    """With messages=0 (completions, embeddings) only the texts are counted."""
    assert count_messages_tokens(["hello world", "hello world"], "gpt-4o", messages=0) == 4
    assert count_messages_tokens([], "gpt-4o", messages=0) == 0


def test_decision_is_remembered_until_reset(small_o200k: tiktoken.Encoding, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoding chosen for a model is remembered; _reset_for_tests() forgets it."""
    assert count_tokens("hello world", "gpt-4o") == 2
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "o200k_base")
    assert count_tokens("hello world", "gpt-4o") == 2
    _tokens._reset_for_tests()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert count_tokens("hello world", "gpt-4o") == 3
