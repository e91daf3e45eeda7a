"""Every benchmark's quick mode runs in CI: its correctness checks (no overshoot, nothing left
held, exact sums, answers that match) must hold; nothing is asserted about time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from run_all import BENCHMARKS  # noqa: E402  (bench/ is not a package)


@pytest.mark.parametrize("name", sorted(set(BENCHMARKS) - {"waste"}))  # waste: tests/test_bench_waste.py
def test_quick_mode_passes_its_checks(name: str, tmp_path: Path) -> None:
    """``bench/run_all.py --quick --only NAME`` exits 0 and saves its results as JSON."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken")}
    done = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--only", name, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["results"]
    assert saved["machine"]["cores"]
