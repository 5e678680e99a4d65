"""fedgate.congestion: sans-IO congestion controllers and the QUIC link carrier.

The controller registry is built here, explicitly, once (no import side effects): ``K_CONTROLLERS``
maps a name to a factory. :func:`create_controller` and :func:`check_controller_name` raise
:class:`~fedgate.errors.UnknownPluginError` listing the valid names. The QUIC carrier
(:mod:`fedgate.congestion.quic_link`) imports aioquic and asyncio and is therefore not imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from fedgate.congestion._base import (
    CongestionController,
    CongestionControllerFactory,
    CongestionStatistics,
    RateSample,
    SentPacket,
)
from fedgate.congestion._ltbbr import LtBbr, LtBbrState
from fedgate.congestion._newreno import NewReno
from fedgate.congestion._pacer import Pacer
from fedgate.errors import UnknownPluginError

__all__ = [
    "K_CONTROLLERS",
    "CongestionController",
    "CongestionControllerFactory",
    "CongestionStatistics",
    "LtBbr",
    "LtBbrState",
    "NewReno",
    "Pacer",
    "RateSample",
    "SentPacket",
    "check_controller_name",
    "controller_names",
    "create_controller",
]

K_CONTROLLERS: Mapping[str, CongestionControllerFactory] = MappingProxyType(
    {
        LtBbr.name: LtBbr,
        NewReno.name: NewReno,
    }
)


def controller_names() -> list[str]:
    """The registered controller names, sorted."""
    return sorted(K_CONTROLLERS)


def check_controller_name(name: str, *, path: str = "", source: str = "") -> CongestionControllerFactory:
    """The factory for ``name``; UnknownPluginError (a ConfigError) naming ``path`` otherwise."""
    try:
        return K_CONTROLLERS[name]
    except KeyError:
        raise UnknownPluginError(
            "congestion controller", name, list(K_CONTROLLERS), path=path, source=source
        ) from None


def create_controller(name: str, *, max_datagram_size: int) -> CongestionController:
    """A fresh controller ``name`` for one connection."""
    return check_controller_name(name)(max_datagram_size=max_datagram_size)
