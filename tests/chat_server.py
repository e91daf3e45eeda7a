"""A loopback chat-completions server for multi-process tests: it answers every request with
1,000 input and 200 output tokens and counts, per ``x-user`` header, what it answered."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _ChatHandler(BaseHTTPRequestHandler):
    """Answers POST /v1/chat/completions (1,000 tokens in, 200 out) and counts it, per ``x-user``."""

    protocol_version = "HTTP/1.1"
    # it writes the headers and the body separately: with Nagle and delayed ACKs each call
    # would wait ~40 ms for nothing
    disable_nagle_algorithm = True
    server: Any

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        time.sleep(self.server.delay_s)  # calls stay in flight a while: their holds must count
        payload = json.dumps(
            {
                "id": "chatcmpl-loopback",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "unknown"),
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "logprobs": None,
                        "message": {"role": "assistant", "content": "ok", "refusal": None},
                    }
                ],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200},
            }
        ).encode()
        with self.server.lock:
            user = self.headers.get("x-user", "-")
            self.server.answered[user] += 1
            self.server.input_tokens[user] += 1000
            self.server.output_tokens[user] += 200
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve_chat() -> Iterator[Any]:
    """The server, on a free loopback port (``server.server_port``), until the block ends.

    ``answered``, ``input_tokens`` and ``output_tokens`` are Counters by ``x-user`` ("-" when
    absent), guarded by ``lock``; ``delay_s`` keeps each request in flight that long."""
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    server.lock = threading.Lock()
    server.answered = Counter()
    server.input_tokens = Counter()
    server.output_tokens = Counter()
    server.delay_s = 0.0
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
