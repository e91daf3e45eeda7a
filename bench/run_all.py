"""Every benchmark, one after the other, each saving its results as JSON.

    python bench/run_all.py              # the full runs (tens of minutes on 2 cores); JSON in bench/results/
    python bench/run_all.py --quick      # CI: short runs, correctness checks only, no timing claims
    python bench/run_all.py --only overhead cache

Each benchmark runs in its own process (``bench/bench_*.py --json bench/results/<name>.json``),
so one's threads, caches and imports never colour another's numbers. The exit status is 1 if
any benchmark's correctness checks failed (an overshoot, a false block, a wrong sum...); a
missed speed target never fails a run. ``docs/benchmarks.md`` summarises the saved results.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> the script and its arguments (--json and --quick are added)
BENCHMARKS: dict[str, list[str]] = {
    "overhead": ["bench_overhead.py"],
    "cache": ["bench_cache.py"],
    "ledger-sqlite": ["bench_redis.py", "--store", "sqlite", "--processes", "1", "4"],
    "ledger-redis": ["bench_redis.py", "--processes", "1", "4"],
    "scaling": ["bench_scaling.py"],
    "litellm": ["bench_litellm.py"],
    "waste": ["bench_waste.py"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs for CI: correctness only")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    parser.add_argument("--out", type=Path, help="where the JSON goes (default: bench/results; --quick: a temp dir)")
    args = parser.parse_args(argv)
    out = args.out or (Path(tempfile.gettempdir()) / "tokenguard-bench-quick" if args.quick else HERE / "results")
    failed: list[str] = []
    for name in args.only or BENCHMARKS:
        script, *extra = BENCHMARKS[name]
        command = [sys.executable, str(HERE / script), *extra, "--json", str(out / f"{name}.json")]
        if args.quick:
            command.append("--quick")
        print(f"\n== {name}: {' '.join(command[1:])}", flush=True)
        started = time.monotonic()
        code = subprocess.call(command)
        print(f"== {name}: exit {code} in {time.monotonic() - started:.1f} s", flush=True)
        if code:
            failed.append(name)
    ran = len(args.only or BENCHMARKS)
    print(f"\n{ran - len(failed)} of {ran} benchmark(s) passed their checks; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
