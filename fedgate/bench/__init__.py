"""fedgate.bench: the WAN benchmark (link emulators and the ``fedgate bench wan`` harness).

Public surface (see README.md in this directory for the layout): the link emulators behind
:class:`LinkEmulator`, the transport-runner registry, the matrix rows and the harness entry point
:func:`wan_main` (``fedgate bench wan``). Runnable helpers: ``python -m fedgate.bench.tcp_bulk``,
``python -m fedgate.bench.tun_forwarder``, ``python -m fedgate.bench.udp_probe``.

Heavy or optional pieces (matplotlib) are imported only when used.
"""

from collections.abc import Sequence as _Sequence

from fedgate.bench._emucore import DirectionShape, DirectionStats, EmuDirection, default_queue_bytes
from fedgate.bench._links import LinkEmulator, NetemLink, TunLink, netem_argv, netem_available, open_link
from fedgate.bench._matrix import (
    SEED_ROWS,
    LinkRow,
    LinkSettings,
    link_settings,
    load_rows_file,
    parse_row,
    physical_limit_mbit,
)
from fedgate.bench._report import PlotUnavailableError, TransferResult, format_table, write_plot
from fedgate.bench._sandbox import BenchSetupError, Sandbox, remove_stale
from fedgate.bench._transports import TransportRunner, availability, build_transports, select_transports


def wan_main(argv: _Sequence[str]) -> int:
    """``fedgate bench wan`` (imported on call, so ``python -m fedgate.bench.wan`` runs cleanly)."""
    from fedgate.bench.wan import main

    return main(argv)


__all__ = [
    "SEED_ROWS",
    "BenchSetupError",
    "DirectionShape",
    "DirectionStats",
    "EmuDirection",
    "LinkEmulator",
    "LinkRow",
    "LinkSettings",
    "NetemLink",
    "PlotUnavailableError",
    "Sandbox",
    "TransferResult",
    "TransportRunner",
    "TunLink",
    "availability",
    "build_transports",
    "default_queue_bytes",
    "format_table",
    "link_settings",
    "load_rows_file",
    "netem_argv",
    "netem_available",
    "open_link",
    "parse_row",
    "physical_limit_mbit",
    "remove_stale",
    "select_transports",
    "wan_main",
    "write_plot",
]
