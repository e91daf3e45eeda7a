"""Every example in examples/ runs offline, as a newcomer runs it, and shows its protection working.

Each example runs as a subprocess (``python examples/NAME.py`` from the repository root) with
no API key in its environment and HOME / XDG directories of its own, and each test checks
what it printed: numbers that would come out differently if the cache, a budget, the loop
detector or the attribution broke. examples/pytest_app runs in a pytest process of its own.

Starting an example costs a few seconds of importing the SDKs, so the examples the selected
tests need are all started at once, when the first of them is needed, and run side by side.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest

from redis_server import need_redis_server

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 240  # for one example; side by side, all of them take 30-40 s on a slow 2-core machine

# every example, and how it is run (from the repository root)
COMMANDS: dict[str, list[str]] = {
    name: [sys.executable, f"examples/{name}"]
    for name in (
        "openai_quickstart.py",
        "anthropic_quickstart.py",
        "async_streaming.py",
        "fastapi_budgets.py",
        "agent_loop.py",
        "decorate_function.py",
        "redis_fleet.py",
    )
}
COMMANDS["pytest_app"] = [sys.executable, "-m", "pytest", "examples/pytest_app", "-q", "-p", "no:cacheprovider"]
SLOWEST = ("redis_fleet.py", "pytest_app")  # started first: the fleet starts three more Python processes

F = TypeVar("F", bound=Callable[..., Any])


def runs(name: str) -> Callable[[F], F]:
    """Mark a test as checking the example ``name`` (so that it is started with the others)."""
    assert name in COMMANDS, name

    def mark(test: F) -> F:
        test.example = name  # type: ignore[attr-defined]
        return test

    return mark


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> str:
        """The output of a run that succeeded."""
        assert self.returncode == 0, (
            f"exit code {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )
        return self.stdout


class Examples:
    """The example processes of this test run, started together."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = self._environment(home)
        self.processes: dict[str, subprocess.Popen[str]] = {}
        self.finished: dict[str, Finished] = {}

    @staticmethod
    def _environment(home: Path) -> dict[str, str]:
        """The user's environment without API keys, tokenguard or Redis settings, with every
        user directory in ``home``: an example that wrote to the user's data or cache dir
        would write there, where a test can see it."""
        dropped = ("OPENAI_", "ANTHROPIC_", "AZURE_OPENAI_", "TOKENGUARD_")
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith(dropped)}
        for name in ("REDIS_URL", "PYTEST_ADDOPTS", "PYTEST_PLUGINS"):
            env.pop(name, None)
        dirs = {
            "HOME": "home",
            "XDG_DATA_HOME": "data",
            "XDG_CACHE_HOME": "cache",
            "XDG_CONFIG_HOME": "config",
            "XDG_STATE_HOME": "state",
            "TIKTOKEN_CACHE_DIR": "tiktoken",  # empty: no local encodings, as on a fresh machine
        }
        for variable, sub in dirs.items():
            (home / sub).mkdir()
            env[variable] = str(home / sub)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave no __pycache__ in examples/
        return env

    def start(self, name: str) -> None:
        if name not in self.processes:
            self.processes[name] = subprocess.Popen(
                COMMANDS[name],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

    def result(self, name: str) -> Finished:
        if name not in self.finished:
            self.start(name)
            process = self.processes[name]
            try:
                stdout, stderr = process.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, stderr = process.communicate()
                pytest.fail(f"{name} did not finish in {TIMEOUT_S} s\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
            self.finished[name] = Finished(process.returncode, stdout, stderr)
        return self.finished[name]

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.fixture(scope="module")
def examples(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Examples]:
    """Starts, side by side, every example that a selected test of this module checks."""
    runner = Examples(tmp_path_factory.mktemp("user"))
    here = sys.modules[__name__]
    tests = [getattr(item, "function", None) for item in request.session.items if getattr(item, "module", None) is here]
    names = dict.fromkeys(getattr(test, "example", None) for test in tests if hasattr(test, "example"))
    for name in sorted(names, key=lambda name: name not in SLOWEST):  # the longest runs first
        if name == "redis_fleet.py" and not shutil.which("redis-server"):
            continue  # without redis-server, the fleet's test skips (or fails, in CI)
        runner.start(name)
    yield runner
    runner.stop()


def amount(text: str, pattern: str) -> Decimal:
    """The Decimal that ``pattern``'s group captures in ``text`` (the pattern must match)."""
    match = re.search(pattern, text, flags=re.M)
    assert match, f"{pattern!r} not in:\n{text}"
    return Decimal(match.group(1))


# -- the set of examples ---------------------------------------------------------------------------


def test_every_example_is_run_by_a_test() -> None:
    """A new example must be added to COMMANDS (and get a test here), and to examples/README.md."""
    on_disk = {p.name for p in EXAMPLES.iterdir() if p.name not in ("README.md", "__pycache__")}
    assert on_disk == set(COMMANDS)
    tested = {getattr(f, "example", None) for f in globals().values() if callable(f)}
    assert tested >= set(COMMANDS)
    readme = (EXAMPLES / "README.md").read_text()
    for name in COMMANDS:
        assert f"[{name}" in readme, f"{name} is not in examples/README.md"
    assert {p.name for p in (EXAMPLES / "pytest_app").iterdir() if p.name != "__pycache__"} == {
        "README.md",
        "app.py",
        "test_app.py",
    }


# -- each example ----------------------------------------------------------------------------------


@runs("openai_quickstart.py")
def test_openai_quickstart(examples: Examples) -> None:
    out = examples.result("openai_quickstart.py").check()
    assert "client is an openai.OpenAI: True" in out
    assert "requests that reached the API: 2 of 3 calls" in out  # the repeat was not sent
    # gpt-4o 1,200 in + 250 out = $0.0055; the cache hit costs $0 and saved that
    hit = re.search(r"^cache_hit\s+bob\s+gpt-4o\s+0\s+0\s+(\S+)\s+(\S+)$", out, flags=re.M)
    assert hit, out
    assert (Decimal(hit[1]), Decimal(hit[2])) == (0, Decimal("0.0055"))
    # alice: gpt-4o $0.0055 + gpt-4o-mini (1,200 x $0.15/M + 250 x $0.60/M) $0.00033, exactly
    assert amount(out, r"^guard\.spent\(period=\"day\", user=\"alice\"\) = Decimal\('(.+)'\)$") == Decimal("0.00583")
    assert amount(out, r"^guard\.spent\(user=\"bob\"\)\s+= Decimal\('(.+)'\)$") == 0
    assert amount(out, r"^guard\.spent\(project=\"search\"\)\s+= Decimal\('(.+)'\)$") == Decimal("0.00583")
    assert re.search(r"^guard\.stats\(\): calls=3 cache_hits=1 saved_usd=0\.0055\d* spent_usd=0\.00583\d* ", out, re.M)
    assert amount(out, r"^budget \$5/day: (\S+) USD left") == Decimal("4.99417")


@runs("anthropic_quickstart.py")
def test_anthropic_quickstart(examples: Examples) -> None:
    out = examples.result("anthropic_quickstart.py").check()
    assert "wrapped is an anthropic.Anthropic: True" in out
    assert "cached repeat is the same answer: True" in out
    assert "requests that reached the API: 4 " in out  # 3 guarded calls sent, 1 cache hit, 1 unguarded
    hit = re.search(r"^cache_hit\s+bob\s+claude-haiku-4-5\s+0\s+0\s+(\S+)\s+(\S+)$", out, flags=re.M)
    assert hit, out
    assert (Decimal(hit[1]), Decimal(hit[2])) == (0, Decimal("0.0015"))
    # claude-sonnet-4-5 (900 x $3/M + 120 x $15/M) + claude-haiku-4-5 (900 x $1/M + 120 x $5/M)
    assert amount(out, r"^guard\.spent\(period=\"day\", user=\"alice\"\) = Decimal\('(.+)'\)$") == Decimal("0.006")
    assert amount(out, r"^guard\.spent\(user=\"bob\"\)\s+= Decimal\('(.+)'\)$") == Decimal("0.0015")
    assert len(re.findall(r"^ok ", out, flags=re.M)) == 3  # the unguarded call is in no ledger row
    assert amount(out, r"for alice: (\S+) USD left") == Decimal("1.994")
    assert amount(out, r"for bob: (\S+) USD left") == Decimal("1.9985")


@runs("async_streaming.py")
def test_async_streaming(examples: Examples) -> None:
    out = examples.result("async_streaming.py").check()
    # four concurrent calls, each attributed to the user of its own task
    assert re.search(r"^gather: alice calls=2 spent_usd=0\.000216\d*$", out, re.M), out  # 2 x gpt-4o-mini
    assert re.search(r"^gather: bob   calls=1 spent_usd=0\.000108\d*$", out, re.M), out
    assert re.search(r"^gather: carol calls=1 spent_usd=0\.0008\d*$", out, re.M), out  # claude-haiku-4-5
    assert "2. stream helper: 'Streams are charged for what they used.', 80 output tokens reported" in out
    rows = re.findall(r"^(\d)\. (\w+)\s+(\w+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\S+)  (.+)$", out, flags=re.M)
    assert [(r[0], r[1], r[2], r[7]) for r in rows] == [
        ("2", "ok", "openai", "the stream's usage"),
        ("3", "ok", "openai", "an estimate"),  # no usage in the stream
        ("4", "incomplete", "openai", "an estimate"),  # abandoned after the first chunk
        ("5", "ok", "anthropic", "the stream's usage"),
    ]
    costs = [Decimal(r[6]) for r in rows]
    assert costs[0] == Decimal("0.0018")  # gpt-4o: 400 x $2.50/M + 80 x $10/M, from the stream's usage
    assert costs[3] == Decimal("0.0008")
    assert all(cost > 0 for cost in costs)  # every stream was charged, the abandoned one too
    assert amount(out, r"^guard\.spent\(user=\"dave\"\) = Decimal\('(.+)'\)$") == sum(costs)


@runs("fastapi_budgets.py")
def test_fastapi_budgets(examples: Examples) -> None:
    out = examples.result("fastapi_budgets.py").check()
    answers = re.findall(r"^(POST /ask|GET /budget)\s+X-User: (\w+)\s+-> (\d+)", out, flags=re.M)
    # alice is refused once her $0.01 is (nearly) spent; bob, after her, is still served
    assert answers[:6] == [
        ("POST /ask", "alice", "200"),
        ("POST /ask", "alice", "200"),
        ("POST /ask", "alice", "200"),
        ("POST /ask", "alice", "402"),
        ("POST /ask", "bob", "200"),
        ("GET /budget", "alice", "200"),
    ]
    refusal = re.search(r"X-User: alice -> 402  (.+)$", out, flags=re.M)
    assert refusal, out
    body = json.loads(refusal[1])
    assert body["user"] == "alice"
    assert Decimal(body["limit_usd"]) == Decimal("0.01")
    assert Decimal(body["spent_usd"]) == Decimal("0.00975")  # 3 x gpt-4o (500 in, 200 out) = 3 x $0.00325
    resets = datetime.fromisoformat(body["resets_at"])
    now = datetime.now(UTC)
    assert resets.utcoffset() == timedelta(0)
    assert resets.time() == datetime.min.time()  # midnight UTC
    assert now < resets <= now + timedelta(days=1)
    assert "requests that reached the LLM API: 4" in out  # the refused call was never sent


@runs("agent_loop.py")
def test_agent_loop(examples: Examples) -> None:
    out = examples.result("agent_loop.py").check()
    # exact repeats: the 4th attempt is refused before it is sent
    assert "exact: 4 attempts, 3 requests sent" in out
    assert re.search(r"repeats=4 level='exact' fingerprint=[0-9a-f]{32}$", out, flags=re.M), out
    # near-repeats (a counter and the time change): the normalized level stops them the same way
    assert "near-repeats: 4 attempts, 3 requests sent" in out
    assert re.search(r"repeats=4 level='normalized' fingerprint=[0-9a-f]{32}$", out, flags=re.M), out
    assert "one more attempt: refused (level='cool-down'), not sent" in out
    # a batch over different tickets is not a loop
    assert "batch: 6 tickets, 6 requests sent, none refused" in out
    assert "calls=15 loops_blocked=3 " in out
    assert "(requests that reached the API: 12)" in out


@runs("decorate_function.py")
def test_decorate_function(examples: Examples) -> None:
    out = examples.result("decorate_function.py").check()
    assert "summarize, first call:  requests sent so far = 1" in out
    assert "summarize, same text:   requests sent so far = 1" in out  # the function did not run again
    assert "draft_reply for alice and bob: requests sent so far = 3" in out  # not shared between users
    assert "draft_reply for alice again:   requests sent so far = 3" in out
    hits = re.findall(r"^cache_hit\s+function\s+(\S+)\s+(\S+)\s+function=__main__\.(\w+)", out, flags=re.M)
    # gpt-4o-mini 3,000 in + 150 out = $0.00054; gpt-4o 3,000 in + 150 out = $0.009
    assert [(Decimal(cost), Decimal(saved), fn) for cost, saved, fn in hits] == [
        (0, Decimal("0.00054"), "summarize"),
        (0, Decimal("0.009"), "draft_reply"),
    ]
    assert re.search(r"^ok\s+openai\s+\S+\s+function=__main__\.draft_reply, project=support, user=bob$", out, re.M)
    assert amount(out, r"^guard\.spent\(function=\"__main__\.summarize\"\) = Decimal\('(.+)'\)$") == Decimal("0.00054")
    assert amount(out, r"^guard\.spent\(project=\"support\", user=\"alice\"\) = Decimal\('(.+)'\)$") == Decimal("0.009")
    assert "calls=5 cache_hits=2 " in out


@runs("redis_fleet.py")
def test_redis_fleet(examples: Examples) -> None:
    need_redis_server()  # skipped without redis-server; in CI (CI set) it must be there
    out = examples.result("redis_fleet.py").check()
    assert "redis: a throwaway redis-server on 127.0.0.1:" in out
    workers = re.findall(
        r"^(worker-\d): admitted\s+(\d+), spent (\S+) USD; "
        r"refused: (\S+) spent \+ (\S+) held \+ (\S+) for this call > 0\.05$",
        out,
        flags=re.M,
    )
    assert [w[0] for w in workers] == ["worker-1", "worker-2", "worker-3"]  # each one was refused in the end
    cap = Decimal("0.05")
    for _, _, _, spent, held, needed in workers:  # each refusal was due: the call did not fit
        assert Decimal(spent) + Decimal(held) + Decimal(needed) > cap
    total = amount(out, r"^fleet total \(ledger\): (\S+) USD of the 0\.05 USD cap$")
    assert total <= cap  # the promise: never above the cap, whatever the processes did at once
    assert total > cap - Decimal(workers[0][5])  # the last refusal came with less than one call's room left
    admitted = sum(int(w[1]) for w in workers)
    assert total == sum(Decimal(w[2]) for w in workers)
    assert total == admitted * Decimal("0.002125")  # gpt-4o: 250 in + 150 out per call, exactly
    assert amount(out, r"^budget counter:\s+(\S+) USD spent") == total
    assert amount(out, r"USD spent, (\S+) USD still held$") == 0
    assert f"requests that reached the LLM API: {admitted}\n" in out  # the refused calls were not sent
    assert "OK: the fleet stayed within the cap" in out


@runs("pytest_app")
def test_pytest_app(examples: Examples) -> None:
    out = examples.result("pytest_app").check()
    assert re.search(r"^6 passed in ", out, flags=re.M), out


def test_no_example_wrote_to_the_user_dirs(examples: Examples) -> None:
    """Ledgers and caches go to temporary directories, never the user's data or cache dir."""
    for name in list(examples.processes):
        examples.result(name)
    written = [p for p in examples.home.rglob("*") if "tokenguard" in p.name.lower()]
    assert written == []
