"""What a benchmark run reports: per-transfer results, the table, the progress bar and the plot.

Rules of this module:

1. Pure except :func:`write_plot`, which imports matplotlib only when called (an optional dependency:
   the ``bench`` extra) and raises :class:`PlotUnavailableError` with an install hint when absent.
2. Every figure in the table comes from a :class:`TransferResult`; every result carries the emulator's
   own counters for its transfer, so a reader can check each run against its settings.
3. Units: goodput and limits in Mbit/s (10^6 bits per second of application payload); loss and
   drop columns in percent of the packets concerned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedgate.bench._matrix import LinkRow
from fedgate.errors import LocalError

__all__ = [
    "PlotUnavailableError",
    "TransferResult",
    "format_table",
    "loss_check",
    "progress_line",
    "write_plot",
]


class PlotUnavailableError(LocalError):
    """matplotlib is not installed, so no PNG can be drawn."""


@dataclass(frozen=True, slots=True)
class TransferResult:
    """One transport on one row."""

    transport: str
    """Runner name."""
    row: LinkRow
    """The emulated link."""
    goodput_mbit: float
    """Receiver application bytes in its window / window, Mbit/s; 0 when the transfer failed."""
    limit_mbit: float
    """The physical limit for this transport on this row, Mbit/s."""
    seconds: float
    """The receiver's measured window, seconds."""
    packets_sent: int
    """Packets the sender put on the wire (its own count)."""
    packets_lost: int
    """Packets the sender retransmitted (TCP) or declared lost (QUIC)."""
    emulator: dict[str, Any] = field(default_factory=dict)
    """The emulator's counters for this transfer."""
    host_cpu_busy: float | None = None
    """Fraction of all CPUs busy on the host during the transfer (0..1), from /proc/stat."""
    client: dict[str, Any] = field(default_factory=dict)
    """The sender's JSON line."""
    server: dict[str, Any] = field(default_factory=dict)
    """The receiver's JSON line."""
    error: str = ""
    """Why the transfer failed; empty on success."""
    notes: tuple[str, ...] = ()
    """Warnings about this transfer (emulator saturated, counters off their settings)."""

    @property
    def pct_of_limit(self) -> float:
        """Goodput as a percentage of the physical limit."""
        return 100.0 * self.goodput_mbit / self.limit_mbit if self.limit_mbit > 0 else 0.0

    @property
    def retrans_pct(self) -> float | None:
        """Retransmitted (or declared lost) packets in percent of packets sent."""
        return 100.0 * self.packets_lost / self.packets_sent if self.packets_sent else None

    def data_dir(self, key: str) -> int | None:
        """A counter of the emulator's data direction (``a_to_b``), None if unknown."""
        value = self.emulator.get("a_to_b", {}).get(key)
        return int(value) if value is not None else None

    def queue_drop_pct(self) -> float | None:
        """Self-inflicted loss: tail drops at the bottleneck queue in percent of data packets offered."""
        drops, offered = self.data_dir("drop_queue"), self.data_dir("packets_in")
        return 100.0 * drops / offered if drops is not None and offered else None

    def random_drop_pct(self) -> float | None:
        """The emulator's random drops on the data direction, in percent (compare with the row's loss)."""
        drops, offered = self.data_dir("drop_loss"), self.data_dir("packets_in")
        return 100.0 * drops / offered if drops is not None and offered else None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON, with the derived figures."""
        out = asdict(self)
        out["row"] = {**asdict(self.row), "name": self.row.name}
        out["pct_of_limit"] = self.pct_of_limit
        out["retrans_pct"] = self.retrans_pct
        out["queue_drop_pct"] = self.queue_drop_pct()
        out["random_drop_pct"] = self.random_drop_pct()
        out["notes"] = list(self.notes)
        return out


def loss_check(drops: int, offered: int, p: float) -> float:
    """How many standard deviations ``drops`` out of ``offered`` lies from the expected ``p`` share."""
    if offered == 0 or p <= 0 or p >= 1:
        return 0.0 if drops == 0 or p >= 1 else math.inf
    return (drops - offered * p) / math.sqrt(offered * p * (1 - p))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: Sequence[TransferResult]) -> str:
    """The human table: one line per transfer, rows in run order."""
    head = (
        f"{'row (RTT/loss)':<16}{'rate':>6}  {'transport':<13}{'goodput':>9}{'limit':>8}{'%limit':>8}"
        f"{'retx%':>8}{'qdrop%':>8}{'rdrop%':>8}{'cpu%':>6}  notes"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.row.name:<16}{r.row.rate_mbit:>6g}  {r.transport:<13}  FAILED: {r.error}")
            continue
        cpu = None if r.host_cpu_busy is None else 100 * r.host_cpu_busy
        lines.append(
            f"{r.row.name:<16}{r.row.rate_mbit:>6g}  {r.transport:<13}"
            f"{r.goodput_mbit:>9.2f}{r.limit_mbit:>8.1f}"
            f"{r.pct_of_limit:>7.1f}%{_fmt(r.retrans_pct, '.2f'):>8}{_fmt(r.queue_drop_pct(), '.2f'):>8}"
            f"{_fmt(r.random_drop_pct(), '.3f'):>8}{_fmt(cpu, '.0f'):>6}  {'; '.join(r.notes)}"
        )
    lines.append(
        "goodput/limit in Mbit/s; limit = bottleneck x (1-loss) x payload share; retx% = retransmitted "
        "(TCP) or lost (QUIC) packets / sent;\nqdrop% = tail drops at the emulated queue (self-inflicted); "
        "rdrop% = the emulator's random drops on the data direction (check against the row's loss);\n"
        "cpu% = host CPU busy during the transfer (all cores; other work on the host included)"
    )
    return "\n".join(lines)


def progress_line(done_s: float, total_s: float, label: str, *, width: int = 30) -> str:
    """``[#######.......]  42% label`` (pure; the caller writes it)."""
    frac = 0.0 if total_s <= 0 else min(1.0, max(0.0, done_s / total_s))
    filled = round(frac * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * frac:3.0f}% {label}"


def write_plot(results: Sequence[TransferResult], path: Path) -> None:
    """Goodput per row, one line per transport, the physical limit dashed; PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailableError(
            "matplotlib is not installed, so no plot was drawn; install it with "
            "`pip install 'fedgate[bench]'` (or `pip install matplotlib`)"
        ) from exc
    rows: list[LinkRow] = []
    for r in results:
        if r.row not in rows:
            rows.append(r.row)
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in dict.fromkeys(r.transport for r in results):
        by_row = {r.row: r for r in results if r.transport == name and not r.error}
        pts = [(i, by_row[row].goodput_mbit) for i, row in enumerate(rows) if row in by_row]
        if pts:
            ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker="o", label=name)
    limits = {r.row: r.limit_mbit for r in results}
    ax.plot(xs, [limits[row] for row in rows], linestyle="--", color="grey", label="physical limit")
    ax.set_xticks(xs, [f"{row.name}\n{row.rate_mbit:g} Mbit/s" for row in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("goodput, Mbit/s")
    ax.set_xlabel("emulated link (RTT / random loss per direction)")
    ax.set_title("fedgate bench wan: goodput vs loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
