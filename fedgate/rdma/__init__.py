"""fedgate.rdma: the RDMA link carrier (pyverbs, RC QPs, credits, READ rendezvous).

Importing this package never imports pyverbs: the carrier lives in :mod:`fedgate.rdma.verbs_link`,
named here by import string and loaded by :func:`create_carrier` only when a route selects
``rdma``. The pure cores (``_wire``, ``_credits``, ``_rendezvous``, ``_pool``, ``_session``) and
:mod:`.probe` import neither pyverbs nor asyncio. See README.md in this directory.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fedgate.rdma.config import RdmaConfig
from fedgate.rdma.probe import Transport, choose_transport, rdma_available

if TYPE_CHECKING:
    from fedgate.rdma.verbs_link import RdmaCarrier

__all__ = ["K_CARRIER_IMPORT", "RdmaConfig", "Transport", "choose_transport", "create_carrier", "rdma_available"]

K_CARRIER_IMPORT = "fedgate.rdma.verbs_link:RdmaCarrier"  # the carrier, by import string


def create_carrier(config: RdmaConfig) -> RdmaCarrier:
    """The ``rdma`` carrier; imports verbs_link (and, on first use of a device, pyverbs)."""
    module_name, _, attr = K_CARRIER_IMPORT.partition(":")
    cls: type[RdmaCarrier] = getattr(importlib.import_module(module_name), attr)
    return cls(config)
