"""The carrier registry: transport name -> factory, built here and nowhere else.

Rules of this module:

1. The table is a constant of import strings (``module:attribute``); a carrier's module is imported
   only when that carrier is selected, so pyverbs or aioquic never load for a tcp-only gateway.
2. An unknown name raises :class:`~fedgate.errors.UnknownPluginError` listing the valid names; call
   :func:`check_carrier_name` while loading config/route tables so it fails at load time.
3. The factory contract: ``create_carrier(*args, **kwargs) -> Carrier`` (the
   :class:`~fedgate.proxy.carrier.Carrier` protocol); arguments are the carrier's own config slice,
   passed through by :func:`load_carrier` unchanged.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, cast

from fedgate.errors import ConfigError, UnknownPluginError
from fedgate.proxy.carrier import Carrier

__all__ = ["K_CARRIERS", "carrier_names", "check_carrier_name", "load_carrier"]

K_CARRIERS: Mapping[str, str] = MappingProxyType({
    "tcp": "fedgate.proxy.tcp_carrier:create_carrier",
    "quic": "fedgate.congestion.quic_link:create_carrier",
    "rdma": "fedgate.rdma:create_carrier",
})


def carrier_names() -> list[str]:
    return sorted(K_CARRIERS)


def check_carrier_name(name: str, *, path: str = "", source: str = "") -> None:
    """Raise UnknownPluginError unless ``name`` is a registered carrier."""
    if name not in K_CARRIERS:
        raise UnknownPluginError("carrier", name, list(K_CARRIERS), path=path, source=source)


def load_carrier(name: str, *args: Any, **kwargs: Any) -> Carrier:
    """Import the selected carrier's module and build it with the given arguments."""
    check_carrier_name(name)
    module_name, _, attr = K_CARRIERS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"carrier {name!r} is not available here: {exc}", path="transport") from exc
    return cast(Carrier, factory(*args, **kwargs))
