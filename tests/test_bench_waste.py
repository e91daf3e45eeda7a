"""The waste benchmark's correctness checks hold on its quick run (bench/bench_waste.py)."""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import bench_waste


def test_quick_run_has_no_false_blocks_and_no_overshoot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The guarded day answers every needed call as the unguarded one did, keeps every cap,
    and refuses the waste without sending it."""
    out = tmp_path / "waste.json"
    assert bench_waste.main(["--quick", "--json", str(out)]) == 0, capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert results["checks_passed"]
    assert results["false_blocks"] == []
    assert results["not_answered_unguarded"] == []
    assert results["unexpected"] == []
    overshoot = results["overshoot"]
    assert overshoot["users_over_cap"] == {}
    assert Decimal(overshoot["shared_overshoot_usd"]) == 0
    ledger = results["ledger"]
    assert ledger["attempts"] == ledger["server_requests"]  # a refusal sends nothing
    assert ledger["blocked"] == ledger["refusals_seen_by_app"]
    rows = results["rows"]
    for loop in ("stuck", "counter", "clock"):  # a loop gets max_repeats (3) requests through
        assert rows[loop]["requests_guarded"] == 3
    assert rows["dup"]["requests_guarded"] <= bench_waste.QUICK.faqs  # one request per distinct question
    assert Decimal(rows["total"]["usd_guarded"]) < Decimal(rows["total"]["usd_unguarded"])
