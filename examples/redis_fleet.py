"""A fleet of worker processes sharing one budget through Redis: together they never pass the cap.

What it shows:

- ``Guard(store="redis://host:6379/0", budgets=[...])`` in every process: the budget's spend
  and reservations live in Redis, so the cap is one cap for the whole fleet, not one per process;
- three worker processes calling the LLM as fast as they can, at the same time, until the
  shared cap refuses them (``tokenguard.BudgetExceeded``, nothing sent);
- what each worker was admitted, why its last call was refused (spent + held by calls in flight
  + this call's worst case > the cap), and the fleet's total against the cap: never above it.
  A worker can be refused while other workers' calls still hold their worst case; the last one
  is refused with less than one call's room left.

It needs no API key and no network. The workers are separate processes, so they reach
tokenguard's fake LLM API by URL: a ``tokenguard.testing.FakeServer`` on loopback, named by
``OPENAI_BASE_URL``. Redis: ``$REDIS_URL`` if it is set (the example keeps its keys under a
prefix of its own and deletes them at the end), else a throwaway ``redis-server`` it starts
on a free loopback port, without persistence, and stops at the end (Debian/Ubuntu:
``apt-get install redis-server``). It needs redis-py (``pip install -e ".[redis]"`` from the repository root).
Run it from the repository root::

    python examples/redis_fleet.py
    REDIS_URL=redis://127.0.0.1:6379/0 python examples/redis_fleet.py

docs/scaling.md describes the URL's options (``?prefix=``, ``?on_failure=``, ``?timeout=`` ...).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import tokenguard
from tokenguard.testing import FakeLLM, FakeServer, Reply

WORKERS = 3
# The fleet's shared cap. A name makes it the same budget in every process (by default the
# identity of a budget is its settings, which are the same here anyway).
FLEET_BUDGET = tokenguard.Budget(limit_usd="0.05", period="day", name="fleet-daily")
# A ~1 KB incident report to summarise (the fake API bills 250 input tokens for it).
REPORT = (
    "Summarise this incident report in two lines.\n"
    + (
        "02:14 UTC: the primary database stopped accepting writes; the replica was promoted after "
        "four minutes; 312 checkout requests failed and were retried by the clients; no data was lost. "
    )
    * 5
)


def worker(name: str, store_url: str, start: Barrier, results: Queue[tuple[str, int, Decimal, str]]) -> None:
    """One process of the fleet: call the LLM until the shared cap refuses a call."""
    guard = tokenguard.Guard(store=store_url, budgets=[FLEET_BUDGET])
    client = tokenguard.OpenAI(guard=guard)  # reads OPENAI_API_KEY and OPENAI_BASE_URL, as in production
    admitted, refusal = 0, "never refused"
    start.wait(timeout=120)  # every worker starts spending at the same moment
    with tokenguard.scope(worker=name):
        for _ in range(1000):  # a bound of its own, in case the cap never came
            try:
                client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": REPORT}], max_tokens=200
                )
            except tokenguard.BudgetExceeded as exc:
                # nothing was sent: the fleet's spend, plus what its calls in flight (and those just
                # finished, settled within ~20 ms) hold, left no room for this call's worst case
                refusal = (
                    f"refused: {exc.spent_usd:f} spent + {exc.held_usd:f} held "
                    f"+ {exc.needed_usd:f} for this call > {exc.limit_usd}"
                )
                break
            admitted += 1
    results.put((name, admitted, guard.spent(period="day", worker=name), refusal))
    client.close()
    guard.close()


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """``$REDIS_URL``, or a throwaway ``redis-server`` on a free loopback port."""
    if os.environ.get("REDIS_URL"):
        print("redis: $REDIS_URL")
        yield os.environ["REDIS_URL"]
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit(
            "redis_fleet.py needs Redis: set REDIS_URL=redis://host:6379/0, or install redis-server "
            "(Debian/Ubuntu: apt-get install redis-server) so the example can start a throwaway one."
        )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="tokenguard-redis-") as tmp:
        server = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:  # wait until it answers PING
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"redis-server did not start on port {port}")
                time.sleep(0.05)
            print(f"redis: a throwaway redis-server on 127.0.0.1:{port} (no persistence)")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.terminate()
            server.wait(timeout=10)


def run_fleet(store_url: str) -> list[tuple[str, int, Decimal, str]]:
    """Start the worker processes together; returns what each one reports, by name."""
    spawn = multiprocessing.get_context("spawn")  # fresh processes, as separate hosts would be
    start, results = spawn.Barrier(WORKERS), spawn.Queue()
    processes = [
        spawn.Process(target=worker, args=(f"worker-{i}", store_url, start, results)) for i in range(1, WORKERS + 1)
    ]
    for process in processes:
        process.start()
    reports = sorted(results.get(timeout=180) for _ in processes)
    for process in processes:
        process.join()
    return reports


def main() -> None:
    try:
        import redis
    except ImportError:
        raise SystemExit(
            'redis_fleet.py needs redis-py: pip install -e ".[redis]" (from the repository root)'
        ) from None

    # the fake LLM API, on loopback: every summary bills 250 input and 150 output tokens (gpt-4o: $0.002125)
    fake = FakeLLM(
        Reply(text="The primary failed over in 4 minutes. No data was lost.", input_tokens=250, output_tokens=150)
    )
    with FakeServer(fake) as llm_api, redis_url() as base_url:
        os.environ["OPENAI_BASE_URL"] = llm_api.openai_base_url  # fake API only: delete for the real API
        os.environ["OPENAI_API_KEY"] = "sk-fake"  # fake API only: delete with a real OPENAI_API_KEY
        os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1"  # fake API only: loopback, no proxy

        # a prefix of its own: this run starts from $0 and touches no other keys in that Redis
        prefix = f"tokenguard-example-{uuid.uuid4().hex[:8]}"
        store_url = f"{base_url}{'&' if '?' in base_url else '?'}prefix={prefix}"
        print(f"shared cap: {FLEET_BUDGET.describe()} for {WORKERS} worker processes\n")
        try:
            reports = run_fleet(store_url)
            for name, admitted, spent, refusal in reports:
                print(f"{name}: admitted {admitted:2}, spent {spent} USD; {refusal}")

            fleet = tokenguard.Guard(store=store_url, budgets=[FLEET_BUDGET])  # reads what the fleet recorded
            total = fleet.spent(period="day")
            (status,) = fleet.budget_status()
            fleet.close()
            print(f"\nsum of the workers:   {sum(spent for _, _, spent, _ in reports)} USD")
            print(f"fleet total (ledger): {total} USD of the {FLEET_BUDGET.limit_usd} USD cap")
            print(f"budget counter:       {status.spent_usd:f} USD spent, {status.held_usd:f} USD still held")
            print(f"requests that reached the LLM API: {len(fake.money_requests)}")
        finally:
            if os.environ.get("REDIS_URL"):  # leave the user's Redis as it was
                connection = redis.Redis.from_url(base_url)
                for key in connection.scan_iter(f"{prefix}:*"):
                    connection.delete(key)
                connection.close()

    if total > FLEET_BUDGET.usd:
        raise SystemExit(f"the fleet spent {total} USD, more than the {FLEET_BUDGET.limit_usd} USD cap")
    print(f"OK: the fleet stayed within the cap ({total} <= {FLEET_BUDGET.limit_usd})")


if __name__ == "__main__":
    main()
