"""The table, progress line, loss check and plot (pure parts; the plot needs matplotlib)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest

import fedgate.bench as bench
from fedgate.bench import LinkRow, PlotUnavailableError, TransferResult, format_table, write_plot
from fedgate.bench._report import loss_check, progress_line


def _result(transport: str, row: LinkRow, goodput: float, *, error: str = "") -> TransferResult:
    emu = {"a_to_b": {"packets_in": 1000, "drop_loss": 10, "drop_queue": 5}}
    return TransferResult(
        transport, row, goodput, 96.5, 20.0, 1000, 20, emulator=emu, host_cpu_busy=0.5, error=error
    )


def test_result_derived_figures() -> None:
    r = _result("kernel-bbr", LinkRow(80, 1, 100), 48.25)
    assert r.pct_of_limit == pytest.approx(50.0)
    assert r.retrans_pct == pytest.approx(2.0)
    assert r.queue_drop_pct() == pytest.approx(0.5)
    assert r.random_drop_pct() == pytest.approx(1.0)
    d = r.as_dict()
    assert d["row"]["name"] == "80ms/1%" and d["pct_of_limit"] == pytest.approx(50.0)


def test_table_lists_results_and_failures() -> None:
    row = LinkRow(80, 1, 100)
    text = format_table(
        [_result("kernel-bbr", row, 48.25), _result("fedgate-quic", row, 0, error="server: boom")]
    )
    assert "kernel-bbr" in text and "48.25" in text and "50.0%" in text
    assert "FAILED: server: boom" in text


def test_progress_line() -> None:
    assert progress_line(5, 10, "x", width=10) == "[#####.....]  50% x"
    assert progress_line(20, 10, "y", width=4) == "[####] 100% y"
    assert progress_line(0, 0, "z", width=2) == "[..]   0% z"


def test_loss_check() -> None:
    assert loss_check(100, 10_000, 0.01) == 0.0
    assert loss_check(130, 10_000, 0.01) == pytest.approx(30 / math.sqrt(99))
    assert loss_check(0, 0, 0.01) == 0.0
    assert loss_check(3, 100, 0.0) == math.inf


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the bench extra) absent"
)
def test_plot_is_written(tmp_path: Path) -> None:
    rows = [LinkRow(20, 0.01, 100), LinkRow(80, 1, 100)]
    results = [_result(t, r, g) for t in ("kernel-cubic", "kernel-bbr") for r, g in zip(rows, (90.0, 3.0))]
    results.append(_result("fedgate-quic", rows[0], 0.0, error="x"))
    path = tmp_path / "plot.png"
    write_plot(results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail, as when absent
    with pytest.raises(PlotUnavailableError) as info:
        write_plot([_result("kernel-bbr", LinkRow(20, 0, 100), 1.0)], tmp_path / "p.png")
    assert "pip install" in str(info.value)
    assert not (tmp_path / "p.png").exists()


def test_exports_are_in_sync() -> None:
    exported = set(bench.__all__)
    public = {n for n in dir(bench) if not n.startswith("_")}
    modules = {"wan", "tcp_bulk", "tun_forwarder", "udp_probe", "proxy"}
    assert exported == public - modules
    for name in exported:
        assert getattr(bench, name) is not None


def test_notes_flag_runs_that_cannot_be_trusted() -> None:
    from fedgate.bench.wan import _with_notes

    row = LinkRow(80, 1, 100)
    data = {"packets_in": 10_000, "drop_loss": 300, "drop_queue": 0, "packets_out": 9700, "late_sum_s": 29.1}
    emu: dict[str, Any] = {
        "a_to_b": data,
        "b_to_a": {"packets_in": 100, "drop_loss": 1, "drop_queue": 0, "packets_out": 99, "late_sum_s": 0.0},
        "wall_s": 10.0,
        "cpu_s": 9.5,
        "device_tx_dropped": {"a": 3, "b": 0},
        "write_errors": 0,
    }
    r = TransferResult("kernel-bbr", row, 50.0, 95.6, 10.0, 1000, 20, emulator=emu, host_cpu_busy=0.97)
    notes = " | ".join(_with_notes(r, ceiling_mbit=110.0).notes)
    assert "emulator CPU 95% busy" in notes
    assert "a_to_b deliveries 3.0 ms late" in notes and "b_to_a" not in notes
    assert "random drops 3.000% vs setting 1%" in notes
    assert "3 packets dropped by the kernel before the emulator" in notes
    assert "host CPUs 97% busy" in notes
    assert "emulator ceiling 110" in notes
    clean = {**emu, "cpu_s": 1.0, "device_tx_dropped": {"a": 0, "b": 0}}
    clean["a_to_b"] = {**data, "drop_loss": 100, "late_sum_s": 0.1}
    ok = TransferResult("kernel-bbr", row, 50.0, 95.6, 10.0, 1000, 20, emulator=clean, host_cpu_busy=0.3)
    assert _with_notes(ok, ceiling_mbit=1000.0).notes == ()
