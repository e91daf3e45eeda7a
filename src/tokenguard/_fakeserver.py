"""A real HTTP server on loopback serving a ``FakeLLM``: the fake API the demo, the examples and
end-to-end tests talk to through the SDKs' own HTTP stack. Owns sockets and threads only; what is
answered is ``FakeLLM``'s business.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import httpx2

if TYPE_CHECKING:
    from .testing import FakeLLM

__all__ = ["Exchange", "FakeServer"]


_HOP_BY_HOP: Final = frozenset({"connection", "content-length", "transfer-encoding", "keep-alive", "content-encoding"})


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request the fake server answered: what was asked, and the status and headers it got."""

    method: str
    path: str
    status: int  # 0: the fake dropped the connection
    headers: Mapping[str, str]
    at: float


class _HTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its fake, and can end its open keep-alive connections
    and wait for their threads (the stdlib never joins daemon handler threads)."""

    daemon_threads = True

    def __init__(self, fake: FakeLLM) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake
        self.exchanges: list[Exchange] = []
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.handlers: list[threading.Thread] = []

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="tokenguard-fake-connection",
            daemon=True,
        )
        with self.lock:
            self.connections.add(request)
            self.handlers = [t for t in self.handlers if t.is_alive()]
            self.handlers.append(thread)
        thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: a client that hangs up mid-answer is no news (the stdlib prints a traceback)."""

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """End every open connection, so that handler threads blocked on a keep-alive read return."""
        with self.lock:
            open_now = list(self.connections)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def join_handlers(self, timeout_s: float) -> None:
        """Wait (up to ``timeout_s`` in all) for the connection threads to end."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            threads = list(self.handlers)
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))


class _Handler(BaseHTTPRequestHandler):
    """Adapts one stdlib HTTP request into an ``httpx2.Request`` for the fake, and writes its answer back."""

    protocol_version = "HTTP/1.1"  # keep-alive: every response is framed (Content-Length or chunked)
    timeout = 30  # an idle keep-alive connection is closed after this long
    disable_nagle_algorithm = True  # headers and body go out at once: no 40 ms delayed-ACK stall
    server: _HTTPServer

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a fake server has no access log."""

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _record(self, status: int, headers: Mapping[str, str]) -> None:
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.exchanges.append(Exchange(self.command, path, status, dict(headers), time.monotonic()))

    def _serve(self) -> None:
        host, port = self.server.server_address[:2]
        request = httpx2.Request(
            self.command,
            f"http://{host!s}:{port}{self.path}",
            headers=[(k, v) for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)],
            content=self._body(),
        )
        try:
            response = self.server.fake._handle(request, async_=False)
        except Exception:  # a scripted transport failure: drop the connection, as a network would
            self._record(0, {})
            self.close_connection = True
            return
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP]
        self._record(response.status_code, response.headers)
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        self.send_response(response.status_code)
        for name, value in headers:
            self.send_header(name, value)
        if not streamed:
            body = response.read()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in response.iter_bytes():
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
        except httpx2.HTTPError:  # a scripted broken stream: no final chunk, the connection ends
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")


class FakeServer:
    """A real HTTP server on ``127.0.0.1`` (a free port) answering OpenAI- and Anthropic-shaped
    requests from a ``FakeLLM``, in a daemon thread; a context manager starts and stops it:

        with FakeServer(FakeLLM(Reply(text="Hi", input_tokens=1500, output_tokens=300))) as server:
            client = tokenguard.OpenAI(api_key="sk-demo", base_url=server.openai_base_url)

    ``exchanges`` lists every request answered (method, path, status, response headers).

    Clients reach it directly only if no HTTP proxy is in the way: with ``HTTP_PROXY`` set,
    give them ``http_client=httpx2.Client(trust_env=False)`` or set ``NO_PROXY=127.0.0.1``.
    """

    def __init__(self, fake: FakeLLM | None = None) -> None:
        if fake is None:
            from .testing import FakeLLM  # the fake imports this module to re-export it

            fake = FakeLLM()
        self.fake = fake
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port the server listens on (only while it runs)."""
        if self._server is None or self._thread is None:
            raise RuntimeError("the fake server is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the Anthropic clients' base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """The OpenAI clients' base URL (``.../v1``)."""
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """The Anthropic clients' base URL (the SDK adds ``/v1/messages``)."""
        return self.url

    @property
    def exchanges(self) -> list[Exchange]:
        """Every request answered so far, in order."""
        if self._server is None:
            return []
        with self._server.lock:
            return list(self._server.exchanges)

    def start(self) -> FakeServer:
        """Bind a free loopback port and serve in a daemon thread."""
        if self._thread is not None:
            return self
        self._server = _HTTPServer(self.fake)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="tokenguard-fake-server"
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, end open connections and wait for every handler thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.drop_connections()
        server.join_handlers(timeout_s=5.0)
        server.server_close()
        thread.join()
        self._thread = None  # the exchanges stay readable

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
