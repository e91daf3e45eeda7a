"""Counting tokens without ever touching the network.

tiktoken downloads an encoding the first time it is asked for one; that must never
happen in a call path (it can hang, and tokenguard promises no network of its own). So
an encoding is used only when it is already in memory (``tiktoken.registry.ENCODINGS``,
e.g. one a test built offline) or when tiktoken's on-disk cache already holds the
genuine file (its sha256 checked here first, because tiktoken deletes a bad file and
downloads it again). Otherwise a fast estimator stands in. Claude models have no public
tokenizer, so they always use the estimator.

Pre-fetch encodings on a connected machine with
``TIKTOKEN_CACHE_DIR=/some/dir python -c "import tiktoken; tiktoken.get_encoding('o200k_base')"``
and run with the same ``TIKTOKEN_CACHE_DIR``.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import threading
from collections.abc import Iterable
from typing import Final, Protocol

import tiktoken
import tiktoken.registry

__all__ = ["count_messages_tokens", "count_tokens", "estimate_tokens", "tiktoken_encoding"]

# tiktoken's own download address and pinned sha256 for each file (tiktoken_ext/openai_public.py)
_FILES: Final = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "p50k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
        "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
    ),
    "r50k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    ),
}
# encodings built from another encoding's file
_FILE_OF: Final = {"o200k_harmony": "o200k_base", "p50k_edit": "p50k_base"}

# OpenAI cookbook: 3 tokens of framing per chat message, 3 to prime the reply
_PER_MESSAGE: Final = 3
_REPLY_PRIMING: Final = 3


class _Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


_lock = threading.Lock()
_by_model: dict[str, _Encoder | None] = {}
_on_disk: dict[str, bool] = {}


def _cache_dir() -> str:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _genuine_file_on_disk(encoding: str) -> bool:
    source = _FILES.get(_FILE_OF.get(encoding, encoding))
    if source is None:
        return False
    url, expected = source
    directory = _cache_dir()
    if not directory:
        return False
    path = os.path.join(directory, hashlib.sha1(url.encode()).hexdigest())
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == expected
    except OSError:
        return False


def tiktoken_encoding(model: str) -> _Encoder | None:
    """The tiktoken encoding for ``model`` if it can be had with no download, else ``None``."""
    try:
        return _by_model[model]
    except KeyError:
        pass
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        name = None
    encoder: _Encoder | None = None
    if name is not None:
        loaded = tiktoken.registry.ENCODINGS.get(name)
        if loaded is not None:
            encoder = loaded
        else:
            with _lock:
                if name not in _on_disk:
                    _on_disk[name] = _genuine_file_on_disk(name)
            if _on_disk[name]:
                try:
                    encoder = tiktoken.get_encoding(name)
                except Exception:  # a cache that changed under us: fall back, never fail a call
                    encoder = None
    _by_model[model] = encoder
    return encoder


def estimate_tokens(text: str) -> int:
    """A fast, deliberately generous token estimate: ~4 ASCII characters a token, 1 a token otherwise."""
    if not text:
        return 0
    ascii_chars = len(text.encode("ascii", "ignore"))
    return math.ceil(ascii_chars / 4) + (len(text) - ascii_chars)


def count_tokens(text: str, model: str) -> int:
    """Tokens in ``text`` for ``model``: exact with a local tiktoken encoding, else estimated."""
    if not text:
        return 0
    encoder = tiktoken_encoding(model)
    if encoder is None:
        return estimate_tokens(text)
    return len(encoder.encode_ordinary(text))


def count_messages_tokens(texts: Iterable[str], model: str, *, messages: int) -> int:
    """Input tokens of a chat request: its texts plus the cookbook's per-message framing."""
    body = sum(count_tokens(text, model) for text in texts)
    return body + _PER_MESSAGE * messages + (_REPLY_PRIMING if messages else 0)


def _reset_for_tests() -> None:
    """Forget every encoding decision (tests swap encodings and cache dirs)."""
    with _lock:
        _by_model.clear()
        _on_disk.clear()
