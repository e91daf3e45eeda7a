"""The response cache: what a hit costs, and what a duplicate-heavy workload saves.

1. Hit latency: a cached ``chat.completions.create`` (disk and memory backends) against the
   bare SDK call over the same in-process transport, interleaved; target: median <= 0.3x.
   Repeats take the clients' hot path (src/tokenguard/_hot.py); the "disk, seam" row forces
   the ordinary path (a hit replayed through the SDK's request and response processing), which
   is what a first hit, a raw response or a streamed hit costs.
2. Workload: 2,000 calls drawn from 200 distinct prompts (Zipf-like: a few prompts asked
   very often, as users and retry-happy jobs do), through a cached guard: hit rate, calls
   that reached the API, and USD saved, read from the guard's own stats.

Run: ``python bench/bench_cache.py`` (``--calls N``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx2
import openai

import tokenguard
from tokenguard.testing import FakeLLM, Reply

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, time_pairs
from bench_overhead import CHAT, MSGS  # the same fixed response as the overhead benchmark

TARGET = 0.3  # a hit's median against the bare call's, over an in-process transport


def _handler(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, content=CHAT, headers={"content-type": "application/json"})


def _client(guard: tokenguard.Guard | None) -> Any:
    http = httpx2.Client(transport=httpx2.MockTransport(_handler))
    if guard is None:
        return openai.OpenAI(api_key="sk-bench", base_url="http://bench.test/v1", http_client=http, max_retries=0)
    return tokenguard.OpenAI(api_key="sk-bench", base_url="http://bench.test/v1", http_client=http, guard=guard)


def hit_latency(calls: int, backend: str, directory: str, *, seam: bool = False) -> dict[str, float]:
    guard = tokenguard.Guard(store="memory://", cache=tokenguard.Cache(backend=backend, path=directory))
    bare, cached = _client(None), _client(guard)

    def call(client: Any) -> Any:
        if seam and client is cached:
            with tokenguard.cache_control():  # a cache_control block keeps calls off the hot path
                return client.chat.completions.create(model="gpt-4o", messages=MSGS, temperature=0)
        return client.chat.completions.create(model="gpt-4o", messages=MSGS, temperature=0)

    call(cached)  # the one miss
    for _ in range(200):
        call(bare)
        call(cached)
    t_bare, t_hit = time_pairs(lambda: call(bare), lambda: call(cached), calls)
    guard.flush()
    stats = guard.stats()
    assert stats.cache_hits >= calls, stats  # every measured guarded call was a hit
    guard.close()
    return {"bare_us": statistics.median(t_bare) * 1e6, "hit_us": statistics.median(t_hit) * 1e6}


def workload(calls: int, distinct: int, directory: str) -> dict[str, Any]:
    rng = random.Random(7)
    weights = [1 / (rank + 1) for rank in range(distinct)]
    prompts = rng.choices(range(distinct), weights=weights, k=calls)
    fake = FakeLLM(Reply(input_tokens=1500, output_tokens=300))
    guard = tokenguard.Guard(store="memory://", cache=tokenguard.Cache(backend="disk", path=directory))
    client = fake.openai(guard=guard)
    for prompt in prompts:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": f"question #{prompt}"}], temperature=0
        )
    stats = guard.stats()
    guard.close()
    return {
        "calls": calls,
        "distinct": distinct,
        "sent": len(fake.money_requests),
        "hits": stats.cache_hits,
        "hit_rate": stats.cache_hit_rate,
        "spent_usd": stats.spent_usd,
        "saved_usd": stats.saved_usd,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="measured calls per client")
    parser.add_argument("--json", metavar="PATH", help="save the results as JSON")
    parser.add_argument("--quick", action="store_true", help="a short run for CI (no timing claims)")
    args = parser.parse_args(argv)
    calls = 50 if args.quick else args.calls
    results: dict[str, Any] = {"hit_latency": {}, "target_ratio": TARGET}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'backend':11} {'bare µs':>9} {'hit µs':>8} {'ratio':>6}  target <= {TARGET}")
        rows = (("memory", "memory", False), ("disk", "disk", False), ("disk, seam", "disk", True))
        for label, backend, seam in rows:
            r = hit_latency(calls, backend, str(Path(tmp) / label), seam=seam)
            r["ratio"] = r["hit_us"] / r["bare_us"]
            results["hit_latency"][label] = r
            print(f"{label:11} {r['bare_us']:9.1f} {r['hit_us']:8.1f} {r['ratio']:6.3f}")
        w = workload(200 if args.quick else 2000, 20 if args.quick else 200, str(Path(tmp) / "workload"))
        results["workload"] = w
        print(
            f"\nworkload: {w['calls']} calls, {w['distinct']} distinct prompts -> {w['sent']} sent to the API, "
            f"{w['hits']} hits ({w['hit_rate']:.1%}); spent ${w['spent_usd']}, saved ${w['saved_usd']}"
        )
    save(args.json, "cache", results, calls=calls, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
