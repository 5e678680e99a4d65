"""``fedgate bench he`` runs end to end (tiny batches; the figures themselves are not asserted)."""

from __future__ import annotations

import pytest

from fedgate.compute import bench


def test_bench_he_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench.main(
        ["--bits", "1024", "--seconds", "0.001", "--rounds", "1", "--workers", "1", "--service-batch", "16"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    labels = ("fedgate cpu, DJN fixed base", "fedgate cpu, online part with r^n pool", "service overhead", "   mul ")
    for label in labels:
        assert label in out
    assert ("fate_utils" in out) and ("phe" in out)
