"""The virtual-time controller benchmark: runs every row for every controller, baseline first."""

from __future__ import annotations

import json
import pathlib

import pytest

from fedgate.congestion.sim_bench import K_SEED_ROWS, main, run_row


def test_prints_every_row_for_every_controller(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "sim.json"
    assert main(["--rate", "4", "--duration", "6", "--cc", "newreno,ltbbr", "--json", str(out_json)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 2 * len(K_SEED_ROWS)
    rows = json.loads(out_json.read_text())
    assert [r["cc"] for r in rows[:2]] == ["newreno", "ltbbr"]
    lossy = [r for r in rows if r["loss"] >= 0.01]
    for reno, ours in zip(lossy[0::2], lossy[1::2], strict=True):
        assert ours["share_of_limit"] > 2 * reno["share_of_limit"]


def test_unknown_controller_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cc", "ltbbr,vegas"]) == 2
    assert "valid names" in capsys.readouterr().err


def test_parallel_flows_share_the_link() -> None:
    # two flows starting together overshoot a one-BDP queue briefly in STARTUP (about 1% of packets
    # over 10 s here); a single flow stays far below that (test_ltbbr)
    r = run_row("ltbbr", rate_mbit=20, rtt=0.04, loss=0.0, duration=10, flows=2, seed=1)
    assert r.share_of_limit > 0.9
    assert r.overflow < 0.03
