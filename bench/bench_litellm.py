"""Side by side with LiteLLM: the latency each adds to a chat completion, on the same loopback server.

One loopback server (stdlib ``ThreadingHTTPServer``, HTTP/1.1 keep-alive, no Nagle; a fixed
chat-completion body with usage) runs in a process of its own, so neither half shares a
GIL with it. Both halves call it the same way, with the same prompts, the same number of
calls and the same timing loop (``_litellm_side.interleave``: every client once per prompt,
in a rotated order, so drift hits all alike):

- tokenguard's half, in this venv: the bare ``openai.OpenAI(max_retries=0)`` against
  ``tokenguard.OpenAI`` under a ``Guard(store="memory://", cache=Cache(backend="memory"),
  budgets=[Budget(limit_usd=1e6, period="day", per="user")], retry=Retry(attempts=3))``,
  each call inside ``tokenguard.scope(user=...)`` (8 users in turn).
- LiteLLM's half, in a venv of its own (LiteLLM pins ``openai`` 2.x on ``httpx``; tokenguard
  needs ``openai`` 3.x on ``httpx2``), run as a subprocess of ``_litellm_side.py``: the bare
  ``openai.OpenAI(max_retries=0)`` of that venv against ``litellm.completion(model=
  "openai/gpt-4o-mini", api_base=..., caching=True, num_retries=2)`` with
  ``litellm.cache = litellm.Cache(type="local")`` (in-memory; its defaults: 200 entries,
  10 min) and ``litellm.max_budget`` (the SDK's global USD cap, checked before each call);
  and the same plus LiteLLM's per-user ``BudgetManager`` used as its docs say (check
  ``get_current_cost <= get_total_budget``, call, ``update_cost``), the counterpart of a
  ``per="user"`` budget. LiteLLM's cost map is the bundled one
  (``LITELLM_LOCAL_MODEL_COST_MAP=True``), no callback is set, and an audit hook records any
  socket connect or name lookup that is not to the loopback address (none is allowed).

Every prompt of the timed ``miss`` phase is new to its cache, so each wrapped call is a
cache MISS that pays for the cache lookup and store, the budget check and the accounting;
the server's request count proves it (and that the hit phases sent nothing). Cache HITs are
shown for reference: ``hit_first`` is the first repeat of a prompt, ``hit_repeat`` a prompt
hit before (tokenguard answers those on its hot path, ``src/tokenguard/_hot.py``).

Added latency = wrapped p50 (p99) - bare p50 (p99) within one repetition, on each side's
own bare client; each figure is the median over the repetitions, which alternate which
half goes first. The two bare clients are different ``openai`` versions on different HTTP
stacks, which is why each side is compared with its own. Target: tokenguard's added p50
<= 1/10 of LiteLLM's.

LiteLLM is never a dependency of tokenguard: its venv lives outside the repository
(``--litellm-venv``, default ``~/.cache/tokenguard-bench/venv-litellm-<version>``) and is
created on the first full run (``--no-install`` to refuse). ``--quick`` (CI) checks that
every path answers correctly with a few calls, and skips LiteLLM's half, with a message,
when its venv is not there. ``--json PATH`` writes the results with ``_common.save``.

Run: ``python bench/bench_litellm.py`` (``--calls``, ``--reps``, ``--quick``, ``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import openai

import tokenguard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save
from _litellm_side import ANSWER, MODEL, USAGE, USERS, NetworkWatch, messages, phases

HERE = Path(__file__).resolve().parent

# An exact pin, never "the newest": LiteLLM's PyPI releases have been hijacked before
# (1.82.7 and 1.82.8 shipped a credential stealer), and 1.107.x is no longer on the index.
LITELLM_VERSION = "1.106.2"
# litellm 1.106.2's SDK cache-HIT path imports litellm.proxy, which needs three modules of
# its [proxy] extra (BerriAI/litellm#42195); the bounds are those of that extra.
LITELLM_REQUIREMENTS = (
    f"litellm=={LITELLM_VERSION}",
    "fastapi>=0.136.3,<1.0",
    "orjson>=3.11.6,<4.0",
    "soundfile>=0.12.1,<1.0",
)
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / (
    f"tokenguard-bench/venv-litellm-{LITELLM_VERSION}"
)
SAFE_PTH = {"distutils-precedence.pth", "_virtualenv.pth"}  # what venv and setuptools put there
CLIENTS = {
    "tokenguard": ("bare", "tokenguard"),
    "litellm": ("bare", "litellm", "litellm_bm"),
}
LABELS = {
    ("tokenguard", "bare"): "bare openai {openai}",
    ("tokenguard", "tokenguard"): "tokenguard.OpenAI: cache, budget/user, retry",
    ("litellm", "bare"): "bare openai {openai}",
    ("litellm", "litellm"): "litellm.completion: cache, max_budget",
    ("litellm", "litellm_bm"): "  + BudgetManager per user",
}


def manual_steps(venv: Path) -> str:
    requirements = " ".join(f"'{r}'" for r in LITELLM_REQUIREMENTS)
    return f"  python3.11 -m venv {venv}\n  {venv}/bin/python -m pip install {requirements}"


def unexpected_pth(python: Path) -> list[str]:
    """``.pth`` files in LiteLLM's venv that neither venv nor setuptools put there: a hijacked
    release (litellm 1.82.8's ``litellm_init.pth``) runs its payload from one at every start."""
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return sorted(p.name for p in Path(site).glob("*.pth") if p.name not in SAFE_PTH)


def litellm_python(venv: Path, *, install: bool) -> tuple[Path | None, str]:
    """LiteLLM's interpreter (created first when ``install``), or None and why not."""
    python = venv / "bin" / "python"
    if not python.exists():
        if not install:
            return None, f"LiteLLM's venv {venv} is not there"
        print(f"creating LiteLLM's venv {venv} (once; by hand:)\n{manual_steps(venv)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, *LITELLM_REQUIREMENTS], check=True)
    probe = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version; print(version('litellm'))"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return None, f"{python} has no litellm"
    found = probe.stdout.strip()
    if found != LITELLM_VERSION:
        print(f"note: {venv} has litellm {found}, not the pinned {LITELLM_VERSION}; measuring {found}")
    strange = unexpected_pth(python)
    if strange:
        raise SystemExit(f"refusing to run LiteLLM's venv {venv}: unexpected start-up files {strange}")
    return python, found


class Server:
    """The loopback server, in a process of its own (``_litellm_side.py serve``)."""

    def __init__(self, cpu: int | None) -> None:
        command = [sys.executable, str(HERE / "_litellm_side.py"), "serve"]
        if cpu is not None:
            command += ["--cpu", str(cpu)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()  # the server stops when its stdin closes
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _busy_s() -> float | None:
    """CPU seconds all CPUs have been busy since boot (None where /proc is not there)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _own_s(server_pid: int) -> float:
    """CPU seconds used by this process, its finished children and the server."""
    mine = os.times()
    used = mine.user + mine.system + mine.children_user + mine.children_system
    try:
        with open(f"/proc/{server_pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        used += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        pass
    return used


class Foreign:
    """The share of the machine's CPUs that other processes used while a half ran: a run is
    only a measurement when that stays near 0."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.start = (time.perf_counter(), _busy_s(), _own_s(server_pid))

    def percent(self) -> float | None:
        wall0, busy0, own0 = self.start
        busy = _busy_s()
        if busy is None or busy0 is None:
            return None
        wall = time.perf_counter() - wall0
        other = (busy - busy0) - (_own_s(self.server_pid) - own0)
        return max(0.0, 100 * other / (wall * (os.cpu_count() or 1)))


def tokenguard_half(port: int, args: argparse.Namespace, rep: int, watch: NetworkWatch) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}/v1"
    guard = tokenguard.Guard(
        store="memory://",
        cache=tokenguard.Cache(backend="memory"),
        budgets=[tokenguard.Budget(limit_usd=1_000_000, period="day", per="user")],
        retry=tokenguard.Retry(attempts=3),
    )
    bare_client = openai.OpenAI(api_key="sk-bench", base_url=base, max_retries=0)
    guarded_client = tokenguard.OpenAI(api_key="sk-bench", base_url=base, guard=guard)
    total = args.warmup + args.calls
    tag = f"{rep:02d}"
    prompts = {"bare": messages("b" + tag, total), "tokenguard": messages("g" + tag, total)}
    extra = messages("c" + tag, 2)  # checked before timing, past the prompts timed
    prompts["bare"].append(extra[0])
    prompts["tokenguard"].append(extra[1])

    def bare(_: int, i: int) -> Any:
        return bare_client.chat.completions.create(model=MODEL, messages=prompts["bare"][i], temperature=0)  # type: ignore[arg-type]

    def guarded(n: int, i: int) -> Any:
        with tokenguard.scope(user=USERS[n % len(USERS)]):
            return guarded_client.chat.completions.create(
                model=MODEL,
                messages=prompts["tokenguard"][i],  # type: ignore[arg-type]
                temperature=0,
            )

    fns = {"bare": bare, "tokenguard": guarded}
    checks: dict[str, Any] = {}
    for name, fn in fns.items():
        response = fn(0, total)
        checks[name] = {
            "answer_ok": response.choices[0].message.content == ANSWER,
            "usage_ok": response.usage.prompt_tokens == USAGE["prompt_tokens"]
            and response.usage.completion_tokens == USAGE["completion_tokens"],
        }
    guarded(0, total)  # the same prompt again: a hit
    guard.flush()
    checks["tokenguard"]["hit_on_repeat"] = guard.stats().cache_hits == 1

    result = phases(fns, calls=args.calls, warmup=args.warmup, hits=args.hits, port=port, settle=guard.flush)
    guard.flush()
    totals = guard.stats()
    result.update(
        versions={"tokenguard": version("tokenguard"), "openai": version("openai"), "httpx2": version("httpx2")},
        checks=checks,
        guard_stats={"calls": totals.calls, "cache_hits": totals.cache_hits, "spent_usd": totals.spent_usd},
        spent_per_user={user: guard.spent(period="day", user=user) for user in USERS},
        network={"elsewhere": sorted(set(watch.elsewhere)), "loopback_events": watch.loopback},
    )
    guard.close()
    return result


def litellm_half(python: Path, port: int, args: argparse.Namespace, rep: int, cpu: int | None) -> dict[str, Any]:
    command = [str(python), str(HERE / "_litellm_side.py"), "measure", "--port", str(port), "--rep", str(rep)]
    command += ["--calls", str(args.calls), "--warmup", str(args.warmup), "--hits", str(args.hits)]
    if cpu is not None:
        command += ["--cpu", str(cpu)]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "PYTHONPATH"}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_MODE="PRODUCTION", NO_PROXY="*")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"LiteLLM's half failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def problems(side: str, rep: dict[str, Any]) -> list[str]:
    """What is wrong with one repetition of one side (empty when all is right)."""
    found = []
    wrapped = len(CLIENTS[side]) - 1
    for name, check in rep["checks"].items():
        found += [f"{side} {name}: {what} failed" for what, ok in check.items() if not ok]
    for phase, sent in rep["sent"].items():
        expected = sent["bare_calls"] * (1 + wrapped) if phase == "miss" else sent["bare_calls"]
        if sent["requests"] != expected:
            found.append(f"{side} {phase}: the server saw {sent['requests']} requests, expected {expected}")
    if rep["network"]["elsewhere"]:
        found.append(f"{side}: tried the network beyond the loopback: {rep['network']['elsewhere']}")
    if side == "tokenguard":
        # one checked hit, then every wrapped call of the hit phases (their warm-up included)
        hits = 1 + rep["sent"]["hit_first"]["bare_calls"] + rep["sent"]["hit_repeat"]["bare_calls"]
        if rep["guard_stats"]["cache_hits"] != hits:
            found.append(f"tokenguard: {rep['guard_stats']['cache_hits']} cache hits, expected {hits}")
        if not all(spent > 0 for spent in rep["spent_per_user"].values()):
            found.append("tokenguard: a user's budget was not charged")
    elif not all(cost > 0 for cost in rep["budget_manager_cost"].values()):
        found.append("litellm: BudgetManager charged no user")
    return found


def aggregate(reps: list[dict[str, Any]], side: str) -> dict[str, Any]:
    """Per phase and client: the median over repetitions of p50, p99 and of the added µs."""
    out: dict[str, Any] = {}
    for phase in reps[0]["phases"]:
        out[phase] = {}
        for name in CLIENTS[side]:
            row: dict[str, float] = {}
            for q in ("p50_us", "p99_us", "mean_us"):
                row[q] = statistics.median(r["phases"][phase][name][q] for r in reps)
                if name != "bare":
                    row["added_" + q] = statistics.median(
                        r["phases"][phase][name][q] - r["phases"][phase]["bare"][q] for r in reps
                    )
            out[phase][name] = row
    return out


def print_table(results: dict[str, Any], versions: dict[str, dict[str, str]]) -> None:
    titles = {
        "miss": "cache MISS (every prompt new to its cache): what is measured",
        "hit_first": "cache HIT, first repeat of a prompt (reference)",
        "hit_repeat": "cache HIT, a prompt hit before (reference)",
    }
    for phase, title in titles.items():
        print(f"\n{title}")
        print(f"  {'side':10} {'client':46} {'p50 µs':>9} {'p99 µs':>9} {'added p50':>10} {'added p99':>10}")
        for side in ("tokenguard", "litellm"):
            if results.get(side) is None:
                continue
            for name in CLIENTS[side]:
                r = results[side][phase][name]
                label = LABELS[(side, name)].format(**versions[side])
                added = f"{r['added_p50_us']:10.1f} {r['added_p99_us']:10.1f}" if name != "bare" else f"{'':10} {'':10}"
                shown = side if name == "bare" else ""
                print(f"  {shown:10} {label:46} {r['p50_us']:9.1f} {r['p99_us']:9.1f} {added}")


def source_state() -> str | None:
    """The commit tokenguard was measured at, "+dirty" when src/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "../src"], cwd=HERE, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few calls: check that every path answers (CI)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--calls", type=int, help="timed calls per client, phase and repetition (default 2000)")
    parser.add_argument("--warmup", type=int, help="untimed calls per client first (default 300)")
    parser.add_argument("--hits", type=int, help="timed repeat hits per client (default 1000)")
    parser.add_argument("--reps", type=int, help="repetitions, alternating which half goes first (default 5)")
    parser.add_argument("--litellm-venv", type=Path, default=DEFAULT_VENV, help=f"(default {DEFAULT_VENV})")
    parser.add_argument("--no-install", action="store_true", help="never create LiteLLM's venv: skip its half")
    parser.add_argument("--skip-litellm", action="store_true", help="run tokenguard's half only")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and the clients to CPUs")
    args = parser.parse_args(argv)
    full = {"calls": 2000, "warmup": 300, "hits": 1000, "reps": 5}
    quick = {"calls": 60, "warmup": 10, "hits": 40, "reps": 1}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    started = time.perf_counter()
    watch = NetworkWatch()

    python, why = None, "--skip-litellm"
    if not args.skip_litellm:
        python, why = litellm_python(args.litellm_venv, install=not (args.quick or args.no_install))
    if python is None:
        print(f"LiteLLM's half SKIPPED: {why}. To run it, create the venv once:\n{manual_steps(args.litellm_venv)}")
        print("(or run this benchmark without --quick / --no-install, which creates it)")
    litellm_version = why if python is not None else None

    pin = not args.no_pin and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
    server_cpu, client_cpu = (1, 0) if pin else (None, None)
    server = Server(server_cpu)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    reps: dict[str, list[dict[str, Any]]] = {"tokenguard": [], "litellm": []}
    try:
        for rep in range(args.reps):
            order = ["tokenguard", "litellm"] if rep % 2 == 0 else ["litellm", "tokenguard"]
            for side in order:
                if side == "litellm" and python is None:
                    continue
                t0, foreign = time.perf_counter(), Foreign(server.process.pid)
                if side == "tokenguard":
                    run = tokenguard_half(server.port, args, rep, watch)
                else:
                    assert python is not None
                    run = litellm_half(python, server.port, args, rep, client_cpu)
                run["wall_s"], run["foreign_cpu_pct"] = time.perf_counter() - t0, foreign.percent()
                reps[side].append(run)
                other = "" if run["foreign_cpu_pct"] is None else f", other processes {run['foreign_cpu_pct']:.0f}% CPU"
                print(f"repetition {rep + 1}/{args.reps}: {side} half {run['wall_s']:.1f} s{other}", flush=True)
    finally:
        server.close()
    wall = time.perf_counter() - started

    failures = [p for side, runs in reps.items() for run in runs for p in problems(side, run)]
    results: dict[str, Any] = {side: (aggregate(runs, side) if runs else None) for side, runs in reps.items()}
    versions = {side: runs[0]["versions"] for side, runs in reps.items() if runs}
    tg_added = results["tokenguard"]["miss"]["tokenguard"]["added_p50_us"]
    ratios: dict[str, float] = {}
    if results["litellm"] is not None:
        for name in ("litellm", "litellm_bm"):
            lite_added = results["litellm"]["miss"][name]["added_p50_us"]
            ratios[name] = tg_added / lite_added if lite_added > 0 else float("inf")
    # judged against the cheaper LiteLLM set-up (the larger ratio); a quick run judges nothing
    verdict = None if not ratios or args.quick else max(ratios.values()) <= 0.1

    print(
        f"\n{args.calls} timed calls per client and phase after {args.warmup} warm-up, {args.reps} repetition(s), "
        f"medians over repetitions; {len(USERS)} users; server and clients on CPUs "
        f"{(server_cpu, client_cpu) if pin else 'not pinned'}"
    )
    if "litellm" in versions:
        lv = versions["litellm"]
        print(f"LiteLLM {lv['litellm']} (openai {lv['openai']}, httpx {lv['httpx']}), its own venv {python}")
    tv = versions["tokenguard"]
    print(f"tokenguard {tv['tokenguard']} (openai {tv['openai']}, httpx2 {tv['httpx2']})")
    print_table(results, versions)
    if ratios:
        print(
            f"\nadded p50, tokenguard / LiteLLM: {ratios['litellm']:.3f} (vs cache + max_budget), "
            f"{ratios['litellm_bm']:.3f} (vs + BudgetManager); target <= 0.1: "
            + ("not judged (--quick: too few calls)" if verdict is None else "MET" if verdict else "NOT MET")
        )
        if reps["litellm"][0]["current_cost"] == 0:
            print(
                "note: litellm._current_cost stayed 0 after every call, so litellm.max_budget (checked before each "
                "call) could never refuse one: LiteLLM adds spend to it only for dict results"
            )
    print(f"wall time {wall:.1f} s")
    foreign = [r["foreign_cpu_pct"] for runs in reps.values() for r in runs if r["foreign_cpu_pct"] is not None]
    if foreign:
        print(
            f"CPU not used by this benchmark (other processes, and kernel work charged to none, such as "
            f"loopback TCP): at most {max(foreign):.0f}% of the CPUs during a half, median "
            f"{statistics.median(foreign):.0f}%"
        )
        if max(foreign) > 10 and not args.quick:
            print("warning: the machine was not idle: compare these figures with care")
    for failure in failures:
        print(f"FAILED: {failure}")

    save(
        args.json,
        "litellm",
        {
            **results,
            "ratio_added_p50": ratios,
            "target_met": verdict,
            "versions": versions,
            "wall_s": wall,
            "failures": failures,
            "repetitions": reps,
        },
        calls=args.calls,
        warmup=args.warmup,
        hits=args.hits,
        reps=args.reps,
        quick=args.quick,
        litellm_version=litellm_version,
        litellm_venv=str(args.litellm_venv) if python is not None else None,
        cpus={"server": server_cpu, "clients": client_cpu},
        tokenguard_source=source_state(),
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
