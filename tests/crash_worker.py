"""Child process for tests/test_crash.py: ``python tests/crash_worker.py <mode> <config.json>``, or
``python tests/crash_worker.py --wait`` (import everything, print ``READY``, then read
``<mode> <config.json>`` from stdin: the parent starts its children ahead, so their seconds of
SDK imports overlap).

No test lives here; test_crash.py imports it only for its helpers (``messages``, ``bulk_body``
...), and everything with a side effect (environment, logging) happens in ``main()``. Every mode
talks to the loopback chat server the parent runs (tests/chat_server.py), through a real guarded
``tokenguard.OpenAI`` client; nothing here needs the network. Modes:

``crash``     many threads make calls through a guard on a SQLite ledger, a disk cache and a budget,
              logging ``start`` / ``done`` lines (with ``time.monotonic()``) to an append-only events
              file the parent reads; a bulk writer thread may also store large cache entries in a
              tight loop. It never finishes: the parent SIGKILLs it.
``readonly``  calls through a guard whose disk cache directory is read-only (the parent made it so).
``fulldisk``  the read-only phase if configured, then phases under ``RLIMIT_FSIZE`` (SIGXFSZ ignored,
              so writes past the limit fail with EFBIG): a cache-only phase, a ledger + cache phase,
              a budget phase, then an exit while the "disk" is still full.

Each mode ends its stdout with one ``RESULT {json}`` line; tokenguard's log records go to stderr as
``LOG <LEVEL> <message>`` lines.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import signal
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import tokenguard
from tokenguard._cache import CacheEntry
from tokenguard._usage import Usage

MODEL = "tg-crash-model"  # priced on every guard: $1 / M input tokens, $4 / M output tokens
MAX_TOKENS = 500
API_KEY = "sk-crash-test"


class _Records(logging.Handler):
    """Keeps tokenguard's log records (level, message) for the RESULT, and echoes them to stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[tuple[str, str]] = []
        self.lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        with self.lock_records:
            self.records.append((record.levelname, message))
        try:
            sys.stderr.write(f"LOG {record.levelname} {message}\n")
            sys.stderr.flush()
        except Exception:
            pass

    def take(self) -> list[tuple[str, str]]:
        with self.lock_records:
            out, self.records = self.records, []
        return out


RECORDS = _Records()


def messages(cid: str) -> list[dict[str, str]]:
    """A request whose byte length does not depend on ``cid`` (ids are fixed width): every call
    reserves the same worst case."""
    return [{"role": "user", "content": f"call {cid}: " + "word " * 200}]


def bulk_body(i: int) -> bytes:
    """A large, valid chat completion body (a bulk cache entry's payload), the same for the same ``i``."""
    text = random.Random(i).randbytes(24_000).hex()
    return json.dumps(
        {
            "id": f"chatcmpl-bulk-{i}",
            "object": "chat.completion",
            "created": 0,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "logprobs": None,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                }
            ],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200},
        }
    ).encode()


def bulk_key(i: int) -> str:
    return f"tokenguard-crash-bulk-{i:06d}"


def client_for(guard: tokenguard.Guard, base_url: str, user: str) -> Any:
    return tokenguard.OpenAI(base_url=base_url, api_key=API_KEY, guard=guard, default_headers={"x-user": user})


def priced(guard: tokenguard.Guard) -> tokenguard.Guard:
    guard.register_price(MODEL, input_mtok="1", output_mtok="4")
    return guard


def result(doc: dict[str, Any]) -> None:
    sys.stdout.write("RESULT " + json.dumps(doc) + "\n")
    sys.stdout.flush()


# -- crash ---------------------------------------------------------------------------------------


def run_crash(cfg: dict[str, Any]) -> None:
    guard = priced(
        tokenguard.Guard(
            store=f"sqlite:///{cfg['db']}",
            cache=tokenguard.Cache(path=cfg["cache"]),
            budgets=[tokenguard.Budget(limit_usd=cfg["cap"], period="total", name="crash-cap")],
            budget_hold_s=cfg["hold_s"],
            retry=False,
        )
    )
    client = client_for(guard, cfg["base_url"], "child")
    fd = os.open(cfg["events"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def event(text: str) -> None:
        os.write(fd, f"{text} {time.monotonic():.6f}\n".encode())  # one write(2): survives SIGKILL whole

    temperature = 0 if cfg["cached"] else 0.7
    stop = threading.Event()  # a failure (say, the parent and its server gone) ends every thread

    def caller(t: int) -> None:
        for n in range(cfg["per_thread"]):
            if stop.is_set():
                return
            cid = f"t{t}-{n:05d}"
            event(f"start {cid}")
            try:
                with tokenguard.scope(call=cid):
                    answer = client.chat.completions.create(
                        model=MODEL, messages=messages(cid), max_tokens=MAX_TOKENS, temperature=temperature
                    )
                kind = type(answer).__name__
                event(f"done {cid} {kind}")
            except BaseException as err:  # reported, so the parent fails with the reason
                event(f"fail {cid} {type(err).__name__}:{str(err)[:200].replace(chr(10), ' ')}")
                stop.set()

    def bulk() -> None:
        cache = guard.cache
        assert cache is not None
        for i in range(100_000):
            if stop.is_set():
                return
            body = bulk_body(i)
            entry = CacheEntry(200, "application/json", body, Usage(1000, 200), Decimal("0.0018"), MODEL, time.time())
            event(f"bulk-start {i}")
            cache.save(bulk_key(i), entry)
            event(f"bulk-done {i}")

    threads = [threading.Thread(target=caller, args=(t,), daemon=True) for t in range(cfg["threads"])]
    if cfg["bulk"]:
        threads.append(threading.Thread(target=bulk, daemon=True))
    event(f"ready {os.getpid()}")
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    event("finished")  # the parent kills the child long before this
    stop.set()
    time.sleep(60)


# -- read-only cache -----------------------------------------------------------------------------


def readonly_phase(cfg: dict[str, Any]) -> dict[str, Any]:
    """Calls through a guard on a cache directory the parent made read-only (after a probe write
    shows it really is, for this process)."""
    cache_dir = Path(cfg["cache"])
    probe = cache_dir / "probe-write"
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
    except OSError as err:
        writable, why = False, f"{type(err).__name__}: {err}"
    else:
        probe.unlink()
        writable, why = True, "a probe file could be created"
    if writable:
        return {"writable": True, "why": why}
    RECORDS.take()
    guard = priced(tokenguard.Guard(store="memory://", cache=tokenguard.Cache(path=cache_dir), retry=False))
    client = client_for(guard, cfg["base_url"], "readonly")
    answers = []
    errors = []
    for cid in cfg["calls"]:
        try:
            answer = client.chat.completions.create(model=MODEL, messages=messages(cid), temperature=0)
            answers.append([cid, type(answer).__name__, answer.choices[0].message.content])
        except BaseException as err:
            errors.append(f"{cid}: {type(err).__name__}: {err}")
    client.close()
    guard.close()
    return {"writable": False, "why": why, "answers": answers, "errors": errors, "logs": RECORDS.take()}


def run_readonly(cfg: dict[str, Any]) -> None:
    result(readonly_phase(cfg))


# -- full disk -----------------------------------------------------------------------------------


def run_fulldisk(cfg: dict[str, Any]) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = int(cfg["limit"])
    root = Path(cfg["dir"])
    base_url = cfg["base_url"]
    out: dict[str, Any] = {"limit": limit, "rlimit_before": [soft, hard]}
    if "readonly" in cfg:  # 0. first, before any limit: the read-only cache directory
        out["readonly"] = readonly_phase(cfg["readonly"])

    def full() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    def space() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))

    def call(client: Any, cid: str, **kw: Any) -> list[Any]:
        try:
            answer = client.chat.completions.create(model=MODEL, messages=messages(cid), max_tokens=MAX_TOKENS, **kw)
            return [cid, "ok", type(answer).__name__, answer.choices[0].message.content]
        except BaseException as err:
            return [cid, "error", type(err).__name__, str(err)]

    # 1. the cache alone on the full disk (the ledger in memory)
    guard = priced(tokenguard.Guard(store="memory://", cache=tokenguard.Cache(path=root / "cache-only"), retry=False))
    client = client_for(guard, base_url, "cache-only")
    warm = [call(client, f"w{i}", temperature=0) for i in range(3)]
    RECORDS.take()
    full()
    during = [call(client, f"q{i}", temperature=0) for i in range(5)]
    during += [call(client, f"q{i}", temperature=0) for i in range(5)]  # not stored: sent again
    during += [call(client, f"w{i}", temperature=0) for i in range(3)]  # stored before: reads still work
    logs = RECORDS.take()
    space()
    client.close()
    guard.close()
    out["cache_only"] = {"warm": warm, "during": during, "logs": logs}

    # 2. ledger and cache on the full disk; then the space comes back
    guard = priced(
        tokenguard.Guard(
            store=f"sqlite:///{root / 'ledger.db'}", cache=tokenguard.Cache(path=root / "cache-ledger"), retry=False
        )
    )
    client = client_for(guard, base_url, "ledger")
    warm = [call(client, f"w{i}", temperature=0) for i in range(3)]
    guard.flush()
    RECORDS.take()
    full()
    during = [call(client, f"q{i}", temperature=0) for i in range(20)]
    during += [call(client, f"w{i}", temperature=0) for i in range(3)]  # hits
    time.sleep(0.4)  # the writer thread tries (and fails) at least once
    store: Any = guard.store
    flush_error = None
    try:
        guard.flush()
    except BaseException as err:
        flush_error = f"{type(err).__name__}: {err}"
    queued = store.queued
    logs = RECORDS.take()
    space()
    closed_error = None
    try:
        client.close()
        guard.close()
    except BaseException as err:
        closed_error = f"{type(err).__name__}: {err}"
    out["ledger"] = {
        "warm": warm,
        "during": during,
        "flush_error": flush_error,
        "queued": queued,
        "logs": logs + RECORDS.take(),
        "close_error": closed_error,
    }

    # 3. a budget on the full disk: it cannot be checked, so calls under it are refused
    guard = priced(
        tokenguard.Guard(
            store=f"sqlite:///{root / 'budget.db'}",
            budgets=[tokenguard.Budget(limit_usd=10, period="total", name="full-disk-cap")],
            retry=False,
        )
    )
    client = client_for(guard, base_url, "budget")
    warm = [call(client, f"w{i}") for i in range(2)]
    guard.flush()
    RECORDS.take()
    full()
    during = [call(client, f"q{i}") for i in range(3)]
    logs = RECORDS.take()
    space()
    after = [call(client, "after")]
    client.close()
    guard.close()
    out["budget"] = {"warm": warm, "during": during, "after": after, "logs": logs + RECORDS.take()}

    # 4. the disk is still full when the process exits: the rows it could not write are reported.
    # (settle_delay_s=10: the calls' settles are still queued at exit, and settled by the exit hooks)
    guard = priced(tokenguard.Guard(store=f"sqlite:///{root / 'exit.db'}", retry=False, settle_delay_s=10))
    client = client_for(guard, base_url, "exit")
    warm = [call(client, f"w{i}") for i in range(2)]
    guard.flush()
    RECORDS.take()
    full()
    during = [call(client, f"q{i}") for i in range(5)]
    out["exit"] = {"warm": warm, "during": during, "logs": RECORDS.take()}
    result(out)
    # the process exits now with the limit still in force: the exit hooks must say what is lost
    globals()["_keep"] = (guard, client)  # the guard lives until interpreter exit, as in an app


def main() -> None:
    # only when run as the child (the test module imports this file for its helpers)
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):  # tiktoken must never download in a test child
        os.environ["TIKTOKEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="tiktoken-empty-")
    os.environ["TOKENGUARD_STORE"] = "memory://"  # nothing may fall back to the user's real ledger
    logger = logging.getLogger("tokenguard")
    logger.addHandler(RECORDS)
    logger.setLevel(logging.WARNING)
    if sys.argv[1:] == ["--wait"]:
        # started ahead of its test: pay for the SDK imports (seconds) now, then wait for the order
        _ = (tokenguard.OpenAI, tokenguard.Guard, tokenguard.Cache, tokenguard.Budget)
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        order = sys.stdin.readline().split()
        if not order:
            return  # the parent did not need this worker
        mode, config = order
    else:
        mode, config = sys.argv[1], sys.argv[2]
    cfg = json.loads(Path(config).read_text())
    {"crash": run_crash, "readonly": run_readonly, "fulldisk": run_fulldisk}[mode](cfg)


if __name__ == "__main__":
    main()
