"""What guarding costs: a guarded call against the bare SDK call, on the cache-miss path with
every protection on.

Two transports:

* ``in-process``: an ``httpx2.MockTransport`` returning pre-encoded answers, so nearly all the
  time is the SDK's and tokenguard's own Python (the harshest ratio);
* ``loopback``: a stdlib HTTP server on 127.0.0.1 (keep-alive, Nagle off), so each call also
  crosses real sockets, as every real call does.

Two configurations, each with the response cache, bounded retry, two budgets (a per-user day
cap and a shared month cap, never reached) and the loop detector on:

* ``memory``: ``store="memory://"``, ``Cache(backend="memory")``;
* ``embedded``: the defaults a program gets on disk: a SQLite ledger and a disk cache.

Every call asks something new (the cache misses, the loop detector sees no repeat) with
``temperature=0`` (so the answer is stored), under a scope of 50 users. Bare and guarded
calls are interleaved in one process (the order flipped every pair), so drift hits both; the
report is p50 and p99 of each and their ratios. Settling (pricing, the ledger row, budgets)
runs on a background thread, off the caller's path. The stream row also gives the added cost
per chunk: a 200-chunk answer, read to the end.

Then each protection alone (memory stores, the chat call): a guard with nothing on but the
ledger, then with only retry, only the budgets, only the cache, only the loop detector, so
that the cost of the whole can be read as the sum of its parts.

Run: ``python bench/bench_overhead.py`` (``--calls N``, ``--json PATH``, ``--quick`` for CI).
Targets (p50 ratio): memory <= 1.05, embedded <= 1.10.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai

import tokenguard

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, time_pairs

TARGETS = {"memory": 1.05, "embedded": 1.10}
CHAT_SCENARIO = "openai chat.completions.create"
USERS = 50

MSGS = [{"role": "user", "content": "Summarise the quarterly report in one line."}]

CHAT = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {
                    "role": "assistant",
                    "content": "Revenue rose 12% on strong cloud demand.",
                    "refusal": None,
                },
            }
        ],
        "usage": {
            "prompt_tokens": 1200,
            "completion_tokens": 40,
            "total_tokens": 1240,
            "prompt_tokens_details": {"cached_tokens": 400},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
).encode()


def _chunk(choices: str, extra: str = "") -> bytes:
    head = '{"id":"c","object":"chat.completion.chunk","created":0,"model":"gpt-4o",'
    return f'data: {head}{extra}"choices":{choices}}}\n\n'.encode()


STREAM_WORDS = 200  # content chunks in the streamed answer: the per-chunk cost is measured on it
CHUNKS = [
    _chunk('[{"index":0,"delta":{"role":"assistant","content":""}}]'),
    *[_chunk('[{"index":0,"delta":{"content":"word "}}]')] * STREAM_WORDS,
    _chunk('[{"index":0,"delta":{},"finish_reason":"stop"}]'),
    _chunk("[]", '"usage":{"prompt_tokens":1200,"completion_tokens":40,"total_tokens":1240},'),
    b"data: [DONE]\n\n",
]
MESSAGE = json.dumps(
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": "Revenue rose 12% on strong cloud demand."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 800,
            "output_tokens": 40,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 400,
        },
    }
).encode()


def answer(path: str, body: bytes) -> tuple[str, list[bytes]]:
    """The content type and body pieces for a request (the same for both transports)."""
    if path.endswith("/messages"):
        return "application/json", [MESSAGE]
    if b'"stream":true' in body or b'"stream": true' in body:
        return "text/event-stream", CHUNKS
    return "application/json", [CHAT]


def handler(request: httpx2.Request) -> httpx2.Response:
    kind, pieces = answer(request.url.path, request.content)
    content: Any = iter(pieces) if kind == "text/event-stream" else pieces[0]
    return httpx2.Response(200, content=content, headers={"content-type": kind})


class _Loopback(BaseHTTPRequestHandler):
    """The same answers over real sockets (HTTP/1.1 keep-alive; streams chunked)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        kind, pieces = answer(self.path, self.rfile.read(int(self.headers.get("content-length", 0))))
        self.send_response(200)
        self.send_header("content-type", kind)
        if kind == "text/event-stream":
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for piece in pieces:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("content-length", str(len(pieces[0])))
            self.end_headers()
            self.wfile.write(pieces[0])

    def log_message(self, format: str, *args: Any) -> None:
        pass


# a per-user day cap and a shared month cap, never reached (Budget objects are frozen: shared)
BUDGETS = [
    tokenguard.Budget(limit_usd=10**9, period="day", per="user"),
    tokenguard.Budget(limit_usd=10**9, period="month"),
]

# One protection at a time (memory stores, openai chat, cache miss): what each one costs alone.
ALONE: dict[str, dict[str, Any]] = {
    "none (ledger only)": {},
    "retry": {"retry": tokenguard.Retry()},
    "budgets": {"budgets": BUDGETS},
    "cache": {"cache": tokenguard.Cache(backend="memory")},
    "loops": {"loops": tokenguard.LoopDetector()},
}


def guard_alone(protections: dict[str, Any]) -> tokenguard.Guard:
    """A memory-store guard with only ``protections`` on (everything else off)."""
    settings: dict[str, Any] = {"store": "memory://", "cache": False, "retry": False, "loops": False, "budgets": []}
    return tokenguard.Guard(**{**settings, **protections}, on_alert=lambda alert: None)


def guard_for(config: str, folder: Path) -> tokenguard.Guard:
    """A guard with every protection on; ``memory`` or ``embedded`` (SQLite + disk cache)."""
    if config == "memory":
        store: str = "memory://"
        cache = tokenguard.Cache(backend="memory")
    else:
        store = f"sqlite:///{folder / 'ledger.db'}"
        cache = tokenguard.Cache(path=folder / "cache")
    return tokenguard.Guard(
        store=store, cache=cache, budgets=BUDGETS, loops=tokenguard.LoopDetector(), on_alert=lambda alert: None
    )


@contextmanager
def loopback() -> Iterator[str]:
    """The loopback server's address, while the block runs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Loopback)
    server.daemon_threads = True
    server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]  # a client gone
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def scenarios(guard: tokenguard.Guard, base: str | None) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """(bare, guarded) per scenario; ``base`` is the loopback server, or ``None`` for in-process."""

    def http() -> httpx2.Client:
        return httpx2.Client() if base else httpx2.Client(transport=httpx2.MockTransport(handler))

    root = base or "http://bench.test"
    bare_oai = openai.OpenAI(api_key="sk-bench", base_url=f"{root}/v1", http_client=http(), max_retries=0)
    tg_oai = tokenguard.OpenAI(api_key="sk-bench", base_url=f"{root}/v1", http_client=http(), guard=guard)
    bare_ant = anthropic.Anthropic(api_key="sk-bench", base_url=root, http_client=http(), max_retries=0)
    tg_ant = tokenguard.Anthropic(api_key="sk-bench", base_url=root, http_client=http(), guard=guard)
    n = itertools.count()

    def ask() -> list[dict[str, str]]:  # something new every call: the cache misses
        return [{"role": "user", "content": f"Summarise quarterly report #{next(n)} in one line."}]

    def scoped(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with tokenguard.scope(user=f"user-{next(n) % USERS}"):
                return fn()

        return run

    def chat(client: Any) -> Callable[[], Any]:
        return lambda: client.chat.completions.create(model="gpt-4o", messages=ask(), temperature=0, max_tokens=100)

    def stream(client: Any) -> Callable[[], Any]:
        return lambda: sum(
            1
            for _ in client.chat.completions.create(
                model="gpt-4o",
                messages=ask(),
                temperature=0,
                max_tokens=400,
                stream=True,
                stream_options={"include_usage": True},
            )
        )

    def message(client: Any) -> Callable[[], Any]:
        return lambda: client.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=ask())

    return {
        CHAT_SCENARIO: (chat(bare_oai), scoped(chat(tg_oai))),
        "anthropic messages.create": (message(bare_ant), scoped(message(tg_ant))),
        f"openai chat stream ({STREAM_WORDS + 3} chunks)": (stream(bare_oai), scoped(stream(tg_oai))),
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(
    bare: Callable[[], Any], guarded: Callable[[], Any], calls: int, flush: Callable[[], None]
) -> dict[str, float]:
    """Interleaved calls; p50/p99 of each side, in microseconds, and their ratios."""
    for _ in range(min(200, calls)):  # warm both paths (imports, price cards, SQLite pages)
        bare()
        guarded()
    flush()
    t_bare, t_guarded = time_pairs(bare, guarded, calls)
    flush()
    b50, g50 = statistics.median(t_bare), statistics.median(t_guarded)
    b99, g99 = _pct(t_bare, 0.99), _pct(t_guarded, 0.99)
    return {
        "bare_p50_us": b50 * 1e6,
        "guarded_p50_us": g50 * 1e6,
        "bare_p99_us": b99 * 1e6,
        "guarded_p99_us": g99 * 1e6,
        "added_p50_us": (g50 - b50) * 1e6,
        "ratio_p50": g50 / b50,
        "ratio_p99": g99 / b99,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="measured calls per client and scenario")
    parser.add_argument("--json", metavar="PATH", help="save the results as JSON")
    parser.add_argument("--quick", action="store_true", help="a short run for CI (no timing claims)")
    args = parser.parse_args(argv)
    calls = 8 if args.quick else args.calls
    results: list[dict[str, Any]] = []
    breakdown: list[dict[str, Any]] = []
    failed = 0
    with loopback() as base:
        for transport, config in itertools.product(("in-process", "loopback"), ("memory", "embedded")):
            with tempfile.TemporaryDirectory() as tmp:
                guard = guard_for(config, Path(tmp))
                made = 0
                try:
                    for name, (bare, guarded) in scenarios(guard, base if transport == "loopback" else None).items():
                        n = max(calls // 10, 8) if "stream" in name else calls  # a stream is ~50x a call
                        row = measure(bare, guarded, n, guard.flush)
                        made += n + min(200, n)
                        results.append(
                            {
                                "transport": transport,
                                "config": config,
                                "scenario": name,
                                "protection": "all",
                                "calls": n,
                            }
                            | row
                        )
                    stats = guard.stats()
                    if stats.calls != made or stats.errors:
                        failed += 1
                        print(f"CHECK FAILED {transport}/{config}: {stats}", file=sys.stderr)
                finally:
                    guard.close()
        for transport, (protection, settings) in itertools.product(("in-process", "loopback"), ALONE.items()):
            guard = guard_alone(settings)
            try:
                bare, guarded = scenarios(guard, base if transport == "loopback" else None)[CHAT_SCENARIO]
                row = measure(bare, guarded, calls, guard.flush)
                breakdown.append(
                    {"transport": transport, "config": "memory", "scenario": CHAT_SCENARIO, "protection": protection}
                    | {"calls": calls}
                    | row
                )
                if guard.stats().calls != calls + min(200, calls):
                    failed += 1
                    print(f"CHECK FAILED {transport}/{protection}: {guard.stats()}", file=sys.stderr)
            finally:
                guard.close()
    print(f"python {sys.version.split()[0]}; {calls} interleaved calls per side and scenario")
    print("cache misses, every protection on; µs")
    print(
        f"{'transport':11} {'config':9} {'scenario':32} {'bare p50':>9} {'p99':>7} {'guarded p50':>12} {'p99':>7} "
        f"{'+µs p50':>8} {'ratio p50':>9} {'p99':>6} target"
    )
    for r in results:
        target = TARGETS[r["config"]]
        mark = "met" if r["ratio_p50"] <= target else "MISSED"
        print(
            f"{r['transport']:11} {r['config']:9} {r['scenario']:32} {r['bare_p50_us']:9.0f} {r['bare_p99_us']:7.0f} "
            f"{r['guarded_p50_us']:12.0f} {r['guarded_p99_us']:7.0f} {r['added_p50_us']:8.0f} {r['ratio_p50']:9.3f} "
            f"{r['ratio_p99']:6.3f} <= {target} {mark if not args.quick else '(quick: not judged)'}"
        )
    for r in results:
        if "stream" in r["scenario"]:
            r["added_us_per_chunk"] = r["added_p50_us"] / (STREAM_WORDS + 3)
    per_chunk = [
        f"{r['transport']}/{r['config']} {r['added_us_per_chunk']:.2f} µs" for r in results if "stream" in r["scenario"]
    ]
    print("stream pass-through, added per chunk (p50): " + "; ".join(per_chunk))
    print("\none protection at a time: memory stores, openai chat.completions.create, cache miss; µs")
    print(f"{'transport':11} {'protection':20} {'bare p50':>9} {'guarded p50':>12} {'+µs p50':>8} {'ratio p50':>9}")
    for r in breakdown:
        print(
            f"{r['transport']:11} {r['protection']:20} {r['bare_p50_us']:9.0f} {r['guarded_p50_us']:12.0f} "
            f"{r['added_p50_us']:8.0f} {r['ratio_p50']:9.3f}"
        )
    save(args.json, "overhead", results + breakdown, calls=calls, quick=args.quick, targets=TARGETS)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
