"""What guarding costs: a guarded call (SQLite ledger) against the bare SDK call.

Both clients talk to the same in-process ``httpx2.MockTransport`` that returns a fixed,
pre-encoded response, so the only difference is tokenguard. Calls are interleaved in one
process (bare, guarded, bare, guarded ... with the order flipped every pair) so drift in
CPU frequency or GC hits both equally; the report is the median of each and their ratio.

Settling (pricing, the ledger row, budgets) runs on a background thread, off the caller's
path. The median is the latency a caller sees; the mean also carries that background work,
which in this tight single-threaded loop competes for the GIL.

Run: ``python bench/bench_overhead.py`` (``--calls N``, ``--json``). Target: median ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai

import tokenguard

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


CHUNKS = [
    _chunk('[{"index":0,"delta":{"role":"assistant","content":""}}]'),
    *[_chunk('[{"index":0,"delta":{"content":"word "}}]')] * 20,
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


def handler(request: httpx2.Request) -> httpx2.Response:
    if request.url.path.endswith("/messages"):
        return httpx2.Response(200, content=MESSAGE, headers={"content-type": "application/json"})
    if b'"stream":true' in request.content:
        return httpx2.Response(200, content=iter(CHUNKS), headers={"content-type": "text/event-stream"})
    return httpx2.Response(200, content=CHAT, headers={"content-type": "application/json"})


def http() -> httpx2.Client:
    return httpx2.Client(transport=httpx2.MockTransport(handler))


def scenarios(guard: tokenguard.Guard) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    bare_oai = openai.OpenAI(api_key="sk-bench", base_url="http://bench.test/v1", http_client=http(), max_retries=0)
    tg_oai = tokenguard.OpenAI(api_key="sk-bench", base_url="http://bench.test/v1", http_client=http(), guard=guard)
    bare_ant = anthropic.Anthropic(api_key="sk-bench", base_url="http://bench.test", http_client=http(), max_retries=0)
    tg_ant = tokenguard.Anthropic(api_key="sk-bench", base_url="http://bench.test", http_client=http(), guard=guard)

    def stream(client: Any) -> Callable[[], Any]:
        return lambda: list(
            client.chat.completions.create(
                model="gpt-4o", messages=MSGS, stream=True, stream_options={"include_usage": True}
            )
        )

    return {
        "openai chat.completions.create": (
            lambda: bare_oai.chat.completions.create(model="gpt-4o", messages=MSGS),
            lambda: tg_oai.chat.completions.create(model="gpt-4o", messages=MSGS),
        ),
        "openai chat stream (23 events)": (stream(bare_oai), stream(tg_oai)),
        "anthropic messages.create": (
            lambda: bare_ant.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=MSGS),
            lambda: tg_ant.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=MSGS),
        ),
    }


def measure(
    bare: Callable[[], Any], guarded: Callable[[], Any], calls: int, flush: Callable[[], None]
) -> dict[str, float]:
    for _ in range(200):  # warm both paths (imports, price cards, SQLite pages)
        bare()
        guarded()
    flush()
    t_bare: list[float] = []
    t_guarded: list[float] = []
    clock = time.perf_counter
    gc.collect()
    for i in range(calls):
        pair = ((bare, t_bare), (guarded, t_guarded))
        for fn, out in pair if i % 2 == 0 else reversed(pair):
            start = clock()
            fn()
            out.append(clock() - start)
    # settling still queued at the end is part of the guarded calls' cost (in the mean)
    start = clock()
    flush()
    leftover = clock() - start
    mb, mg = statistics.median(t_bare), statistics.median(t_guarded)
    ab, ag = statistics.fmean(t_bare), (sum(t_guarded) + leftover) / calls
    return {
        "bare_median_us": mb * 1e6,
        "guarded_median_us": mg * 1e6,
        "overhead_us": (mg - mb) * 1e6,
        "ratio": mg / mb,
        "mean_overhead_us": (ag - ab) * 1e6,
        "mean_ratio": ag / ab,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="measured calls per client and scenario")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        guard = tokenguard.Guard(store=f"sqlite:///{Path(tmp) / 'bench-ledger.db'}")
        results = {name: measure(b, g, args.calls, guard.flush) for name, (b, g) in scenarios(guard).items()}
        rows = guard.stats().calls
        guard.close()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(
            f"python {sys.version.split()[0]}, {args.calls} interleaved calls per client, SQLite ledger ({rows} rows)"
        )
        print("median: the latency a caller sees; mean: also the settling done off the caller's path")
        head = f"{'scenario':34} {'bare µs':>9} {'guarded µs':>11} {'+µs':>7} {'ratio':>7}"
        print(f"{head} {'mean +µs':>9} {'mean ratio':>10}")
        for name, r in results.items():
            print(
                f"{name:34} {r['bare_median_us']:9.1f} {r['guarded_median_us']:11.1f} "
                f"{r['overhead_us']:7.1f} {r['ratio']:7.3f} {r['mean_overhead_us']:9.1f} {r['mean_ratio']:10.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
