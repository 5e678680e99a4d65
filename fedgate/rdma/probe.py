"""Is RDMA usable here, and which transport does ``auto`` pick for a route endpoint?

Rules of this module:

1. Never imports pyverbs (the carrier is imported only when selected): it reads sysfs and asks
   ``importlib.util.find_spec``. The sysfs root is a parameter so tests can point it at a fake tree.
2. :func:`choose_transport` is pure: the caller passes what it knows and logs the returned reason.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Literal

__all__ = ["Transport", "choose_transport", "rdma_available"]

Transport = Literal["tcp", "quic", "rdma", "auto"]
K_SYSFS_IB = pathlib.Path("/sys/class/infiniband")


def rdma_available(device: str = "", *, sysfs: pathlib.Path = K_SYSFS_IB) -> tuple[bool, str]:
    """``(True, "rxe0 port 1 active")`` when a device with an active port and pyverbs are present.

    ``device`` restricts the check to one device name (the ``[rdma] device`` setting).
    """
    try:
        names = sorted(p.name for p in sysfs.iterdir()) if sysfs.is_dir() else []
    except OSError as exc:
        return False, f"cannot list {sysfs}: {exc.strerror}"
    if device:
        names = [n for n in names if n == device]
    if not names:
        return False, f"no RDMA device{' named ' + device if device else ''} in {sysfs}"
    active = []
    for name in names:
        for port in sorted((sysfs / name / "ports").glob("*")):
            try:
                state = (port / "state").read_text().strip()
            except OSError:
                continue
            if "ACTIVE" in state:
                active.append(f"{name} port {port.name} active")
    if not active:
        return False, f"RDMA device(s) {', '.join(names)} have no active port"
    if importlib.util.find_spec("pyverbs") is None:
        return False, "pyverbs is not importable (install python3-pyverbs for this Python)"
    return True, active[0]


def choose_transport(
    requested: Transport,
    *,
    local_datacenter: str,
    peer_datacenter: str,
    local_rdma: tuple[bool, str],
    peer_rdma: bool,
) -> tuple[Literal["tcp", "quic", "rdma"], str]:
    """The transport to use for one endpoint and why (log the reason when it is a fallback).

    ``auto`` picks ``rdma`` only when both ends carry the same non-empty datacenter label and both
    have a device (``local_rdma`` is :func:`rdma_available`'s answer, ``peer_rdma`` what the route
    table says of the peer); otherwise ``tcp``. Explicit choices are returned unchanged.
    """
    if requested != "auto":
        return requested, f"{requested} requested"
    if not local_datacenter or local_datacenter != peer_datacenter:
        where = f"{local_datacenter or '(none)'} vs {peer_datacenter or '(none)'}"
        return "tcp", f"auto: tcp, not rdma: the ends are in different datacenters ({where})"
    ok, why = local_rdma
    if not ok:
        return "tcp", f"auto: tcp, not rdma: no local RDMA ({why})"
    if not peer_rdma:
        return "tcp", "auto: tcp, not rdma: the route table does not list an RDMA device for the peer"
    return "rdma", f"auto: rdma (same datacenter {local_datacenter!r}; {why})"
