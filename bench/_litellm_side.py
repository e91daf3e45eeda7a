"""The half of ``bench_litellm.py`` that runs in LiteLLM's own venv, and what both halves share.

It imports only the standard library at module level, so any Python 3.11 can run it:

- ``python _litellm_side.py serve [--cpu N]``: the loopback chat-completions server. It
  prints its port on the first line of stdout and stops when its stdin closes (the bench
  process holds the other end). ``GET /stats`` answers the requests and keep-alive
  connections it has served so far.
- ``python _litellm_side.py measure --port P ...`` (inside LiteLLM's venv): one repetition
  of the LiteLLM half, printed as one JSON document on stdout.
- ``interleave``, ``summary``, ``stats`` and the prompt helpers are imported by
  ``bench_litellm.py``, so that both halves time their calls with the very same loop.

Never import this with ``litellm`` in the same venv as tokenguard: ``litellm`` and ``openai``
are imported inside ``measure`` only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "gpt-4o-mini"
ANSWER = "Revenue rose 12% on strong cloud demand."
USAGE = {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 1240}
BODY = json.dumps(
    {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {"role": "assistant", "content": ANSWER, "refusal": None},
            }
        ],
        "usage": {
            **USAGE,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
).encode()
USERS = tuple(f"user-{n}" for n in range(8))
FIRST_HITS = 90  # first hits measured per client (see phases())


# --- the loopback server -------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # headers and body go out at once: no 40 ms delayed-ACK stall
    server: Any

    def setup(self) -> None:
        super().setup()
        self.posted = False

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if not self.path.endswith("/chat/completions"):
            self.send_error(404)
            return
        with self.server.lock:
            self.server.requests += 1
            if not self.posted:
                self.posted = True
                self.server.connections += 1
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def do_GET(self) -> None:
        with self.server.lock:
            body = json.dumps({"requests": self.server.requests, "connections": self.server.connections}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(cpu: int | None) -> None:
    """Serve on a free loopback port until stdin closes."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.lock = threading.Lock()
    server.requests = 0
    server.connections = 0  # connections that carried at least one chat request
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    print(server.server_port, flush=True)
    sys.stdin.read()  # the bench process closes it (or dies)
    server.shutdown()
    server.server_close()


def stats(port: int) -> dict[str, int]:
    """What the server has answered so far (a fresh connection, not counted)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


# --- timing, shared by both halves ---------------------------------------------------------


def messages(tag: str, count: int) -> list[list[dict[str, str]]]:
    """``count`` distinct prompts of the same length; ``tag`` (one letter and the repetition)
    keeps each client's prompts apart from every other client's, so a cache never answers
    a prompt that another client sent."""
    return [
        [{"role": "user", "content": f"[{tag}-{i:06d}] Summarise the quarterly report in one line."}]
        for i in range(count)
    ]


def interleave(fns: dict[str, Callable[[int], Any]], indices: range) -> dict[str, list[float]]:
    """Call every client once per index, in an order rotated at each index (a, b, c; b, c, a;
    ...) so drift hits all alike; the seconds each call took, per client."""
    names = list(fns)
    orders = [[(name, fns[name]) for name in names[k:] + names[:k]] for k in range(len(names))]
    out: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    gc.collect()
    for i in indices:
        for name, fn in orders[i % len(orders)]:
            start = clock()
            fn(i)
            out[name].append(clock() - start)
    return out


def summary(seconds: list[float]) -> dict[str, float]:
    """p50, p99 and mean in microseconds."""
    ordered = sorted(seconds)
    p99 = statistics.quantiles(ordered, n=100, method="inclusive")[98] if len(ordered) > 1 else ordered[0]
    return {
        "n": len(ordered),
        "p50_us": statistics.median(ordered) * 1e6,
        "p99_us": p99 * 1e6,
        "mean_us": statistics.fmean(ordered) * 1e6,
    }


def phases(
    fns: dict[str, Callable[[int, int], Any]],
    *,
    calls: int,
    warmup: int,
    hits: int,
    port: int,
    settle: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """The three phases of one repetition, for a bare client (``"bare"``) and wrapped ones.

    ``fns[name](phase_index, prompt_index)`` makes one call with that client's prompt.

    - ``miss``: ``warmup`` then ``calls`` interleaved calls, every prompt new to its cache.
    - ``hit_first``: the first repeat of the last ``FIRST_HITS`` prompts of ``miss`` (the last
      ones, because LiteLLM's default in-memory cache keeps only 200 entries).
    - ``hit_repeat``: ``hits`` calls cycling over the last 50 of those, hit before.

    Returns the summaries, and the requests the server saw in each phase (``sent``)."""
    out: dict[str, Any] = {"phases": {}, "sent": {}}

    def run(phase: str, indices: range, prompt: Callable[[int], int], warm: range | None) -> None:
        calls_of = {name: (lambda i, fn=fn: fn(i, prompt(i))) for name, fn in fns.items()}
        before = stats(port)["requests"]
        if warm is not None:
            interleave(calls_of, warm)
        settle()
        times = interleave(calls_of, indices)
        settle()
        out["sent"][phase] = {
            "requests": stats(port)["requests"] - before,
            "bare_calls": len(indices) + (len(warm) if warm is not None else 0),
        }
        out["phases"][phase] = {name: summary(t) for name, t in times.items()}

    end = warmup + calls
    run("miss", range(warmup, end), lambda i: i, range(warmup))
    first = min(calls, FIRST_HITS)
    run("hit_first", range(first), lambda i: end - first + i, None)
    cycle = min(50, first)
    run("hit_repeat", range(hits), lambda i: end - cycle + i % cycle, range(cycle))
    return out


# --- the LiteLLM half (LiteLLM's venv) ------------------------------------------------------


class NetworkWatch:
    """Records every name lookup and socket connect this process makes that is not to the
    loopback address. It wraps ``socket.getaddrinfo`` and ``socket.socket.connect`` (install
    it before importing litellm) rather than adding an audit hook, which would run on every
    ``id()`` call of the timed code too."""

    def __init__(self) -> None:
        self.elsewhere: list[str] = []
        self.loopback = 0
        lookup, connect = socket.getaddrinfo, socket.socket.connect

        def watched_lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
            self._saw("getaddrinfo", host)
            return lookup(host, *args, **kwargs)

        def watched_connect(sock: socket.socket, address: Any) -> Any:
            self._saw("connect", address[0] if isinstance(address, tuple) else address)
            return connect(sock, address)

        socket.getaddrinfo = watched_lookup
        socket.socket.connect = watched_connect  # type: ignore[method-assign]

    def _saw(self, what: str, host: Any) -> None:
        if isinstance(host, bytes):
            host = host.decode()
        if host in ("127.0.0.1", "localhost", "::1"):
            self.loopback += 1
        else:
            self.elsewhere.append(f"{what} {host}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    watch = NetworkWatch()
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no model cost map fetched from GitHub
    os.environ["LITELLM_MODE"] = "PRODUCTION"  # no .env file read from the working directory
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    workdir = tempfile.mkdtemp(prefix="litellm-bench-")
    os.chdir(workdir)  # BudgetManager writes ./user_cost.json after every update

    started = time.perf_counter()
    import litellm
    import openai
    from litellm import BudgetManager

    import_s = time.perf_counter() - started
    from importlib.metadata import version

    base = f"http://127.0.0.1:{args.port}/v1"
    litellm.suppress_debug_info = True
    litellm.success_callback = []  # the defaults, said out loud: no logging integration
    litellm.callbacks = []
    litellm.cache = litellm.Cache(type="local")  # in-memory response cache
    litellm.max_budget = 1_000_000.0  # the SDK's global USD cap, checked before every call
    budgets = BudgetManager(project_name="tokenguard-bench")  # per-user budgets, client_type="local"
    for user in USERS:
        budgets.create_budget(total_budget=1_000_000.0, user=user, duration="daily")

    bare_client = openai.OpenAI(api_key="sk-bench", base_url=base, max_retries=0)
    total = args.warmup + args.calls
    tag = f"{args.rep:02d}"
    prompts = {name: messages(letter + tag, total) for name, letter in (("bare", "b"), ("litellm", "l"), ("bm", "m"))}

    def bare(_: int, i: int) -> Any:
        return bare_client.chat.completions.create(model=MODEL, messages=prompts["bare"][i], temperature=0)  # type: ignore[arg-type]

    def lite(name: str, i: int) -> Any:
        return litellm.completion(
            model=f"openai/{MODEL}",
            messages=prompts[name][i],
            api_base=base,
            api_key="sk-bench",
            temperature=0,
            caching=True,
            num_retries=2,  # bounded retry, 3 attempts (as tokenguard's Retry(attempts=3))
        )

    def with_cap(_: int, i: int) -> Any:
        return lite("litellm", i)

    def with_user_budget(n: int, i: int) -> Any:
        user = USERS[n % len(USERS)]
        # BudgetManager enforces nothing itself: its documented use is check, call, update
        if budgets.get_current_cost(user=user) > budgets.get_total_budget(user):
            raise RuntimeError(f"{user} is over budget")
        response = lite("bm", i)
        budgets.update_cost(completion_obj=response, user=user)
        return response

    fns: dict[str, Callable[[int, int], Any]] = {
        "bare": bare,
        "litellm": with_cap,
        "litellm_bm": with_user_budget,
    }

    # one checked call of each before anything is timed (prompts past the ones timed)
    checks: dict[str, Any] = {}
    extra = messages("c" + tag, 3)
    prompts["bare"].extend(extra[:1])
    prompts["litellm"].extend(extra[1:2])
    prompts["bm"].extend(extra[2:])
    for name, fn in fns.items():
        response = fn(0, total)
        checks[name] = {
            "answer_ok": response.choices[0].message.content == ANSWER,
            "usage_ok": response.usage.prompt_tokens == USAGE["prompt_tokens"]
            and response.usage.completion_tokens == USAGE["completion_tokens"],
        }
    again = with_cap(0, total)  # the same prompt again: a hit
    checks["litellm"]["hit_on_repeat"] = bool(again._hidden_params.get("cache_hit"))

    def drain() -> None:  # let the logging thread finish the previous phase's work
        time.sleep(0.2)

    result = phases(fns, calls=args.calls, warmup=args.warmup, hits=args.hits, port=args.port, settle=drain)
    drain()
    result.update(
        versions={"litellm": version("litellm"), "openai": version("openai"), "httpx": version("httpx")},
        import_s=import_s,
        checks=checks,
        current_cost=litellm._current_cost,  # what litellm.max_budget is compared against
        budget_manager_cost={user: budgets.get_current_cost(user=user) for user in USERS},
        network={"elsewhere": sorted(set(watch.elsewhere)), "loopback_events": watch.loopback},
        workdir=workdir,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bench_litellm.py's helper: the loopback server, LiteLLM's half")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve")
    serve_p.add_argument("--cpu", type=int)
    measure_p = sub.add_parser("measure")
    measure_p.add_argument("--port", type=int, required=True)
    measure_p.add_argument("--calls", type=int, default=2000)
    measure_p.add_argument("--warmup", type=int, default=300)
    measure_p.add_argument("--hits", type=int, default=1000)
    measure_p.add_argument("--rep", type=int, default=0)
    measure_p.add_argument("--cpu", type=int)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.cpu)
        return 0
    print(json.dumps(measure(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
