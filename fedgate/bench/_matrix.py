"""The benchmark matrix: link rows, how a row becomes emulator settings, and the physical limit.

Rules of this module:

1. Pure: no I/O except :func:`load_rows_file`, which reads one TOML file through
   :func:`fedgate.configtree.load_toml`. Bad rows raise :class:`~fedgate.errors.ConfigError`
   naming the flag or the dotted path in the file.
2. A row's RTT is the emulator's added round-trip delay, split evenly between the two directions.
   Its loss is random loss applied per direction: to the data direction always, to the ACK direction
   too unless the run asks for data-only loss.
3. The physical limit of a row is ``bottleneck x (1 - loss) x payload share``, where the payload share
   is the transport's application bytes per IP packet over the MTU. No transport, FEC included, beats it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedgate.bench._emucore import DirectionShape, default_queue_bytes
from fedgate.configtree import bounds, build, load_toml
from fedgate.errors import ConfigError

__all__ = [
    "SEED_ROWS",
    "LinkRow",
    "LinkSettings",
    "RowSpec",
    "RowsFile",
    "link_settings",
    "load_rows_file",
    "parse_row",
    "physical_limit_mbit",
]


@dataclass(frozen=True, slots=True)
class LinkRow:
    """One row of the matrix: an emulated link."""

    rtt_ms: float
    """Round-trip delay added by the emulator, in milliseconds (half in each direction)."""
    loss_pct: float
    """Random loss per direction, in percent (0.1 means one packet in a thousand)."""
    rate_mbit: float
    """Bottleneck rate in Mbit/s (10^6 bits of IP packets per second)."""

    @property
    def name(self) -> str:
        """A short label such as ``80ms/1%``."""
        return f"{self.rtt_ms:g}ms/{self.loss_pct:g}%"


@dataclass(frozen=True, slots=True)
class RowSpec:
    """A ``[[row]]`` table in a rows file."""

    rtt_ms: float = field(default=0.0, metadata=bounds(ge=0, le=5000))
    """Round-trip delay in milliseconds."""
    loss_pct: float = field(default=0.0, metadata=bounds(ge=0, lt=100))
    """Random loss per direction in percent."""
    rate_mbit: float | None = field(default=None, metadata=bounds(gt=0))
    """Bottleneck in Mbit/s; absent means the run's ``--rate``."""


@dataclass(frozen=True, slots=True)
class RowsFile:
    """A rows file: ``[[row]]`` tables."""

    row: tuple[RowSpec, ...] = field(default=(), metadata=bounds(nonempty=True))
    """The rows, in the order they run."""


# The seed's six rows: (RTT in ms, loss in percent).
SEED_ROWS: tuple[tuple[float, float], ...] = ((20, 0.01), (40, 0.1), (80, 1), (160, 2), (320, 4), (320, 10))


def parse_row(text: str, *, rate_mbit: float) -> LinkRow:
    """Parse ``RTT_MS:LOSS_PCT[:RATE_MBIT]`` (a ``--row`` flag)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ConfigError(f"expected RTT_MS:LOSS_PCT[:RATE_MBIT], got {text!r}", path="--row")
    try:
        values = [float(p) for p in parts]
    except ValueError as exc:
        raise ConfigError(f"not a number in {text!r}", path="--row") from exc
    spec = {"rtt_ms": values[0], "loss_pct": values[1]}
    if len(values) == 3:
        spec["rate_mbit"] = values[2]
    built = build(RowSpec, spec, path="--row")
    return LinkRow(built.rtt_ms, built.loss_pct, built.rate_mbit or rate_mbit)


def load_rows_file(path: Path | str, *, rate_mbit: float) -> list[LinkRow]:
    """Read a TOML rows file (``[[row]]`` tables with rtt_ms, loss_pct, optional rate_mbit)."""
    rows = build(RowsFile, load_toml(path), source=str(path))
    return [LinkRow(r.rtt_ms, r.loss_pct, r.rate_mbit or rate_mbit) for r in rows.row]


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """What the emulator does in each direction (A is the sender's side, B the receiver's)."""

    a_to_b: DirectionShape
    """The data direction."""
    b_to_a: DirectionShape
    """The ACK direction."""


def link_settings(
    row: LinkRow, *, queue_bdp: float = 1.0, ack_loss: bool = True, tick_s: float = 0.0
) -> LinkSettings:
    """Emulator settings for a row: RTT split evenly, a tail-drop queue of ``queue_bdp`` BDPs.

    ``tick_s`` is the userspace emulator's delivery tick (:class:`DirectionShape`); netem ignores it.
    """
    rate_bps = row.rate_mbit * 1e6
    one_way = row.rtt_ms / 2000.0
    queue = default_queue_bytes(rate_bps, row.rtt_ms / 1000.0, bdp_multiple=queue_bdp)
    loss = row.loss_pct / 100.0
    data = DirectionShape(delay_s=one_way, loss=loss, rate_bps=rate_bps, queue_bytes=queue, tick_s=tick_s)
    ack = DirectionShape(
        delay_s=one_way, loss=loss if ack_loss else 0.0, rate_bps=rate_bps, queue_bytes=queue, tick_s=tick_s
    )
    return LinkSettings(a_to_b=data, b_to_a=ack)


def physical_limit_mbit(row: LinkRow, *, payload_share: float) -> float:
    """The best goodput any transport can reach on the row, in Mbit/s."""
    return row.rate_mbit * (1.0 - row.loss_pct / 100.0) * payload_share
