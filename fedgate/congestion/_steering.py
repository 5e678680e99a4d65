"""Several processes on one UDP port: SO_REUSEPORT with steering by QUIC connection id.

Rules of this module (socket plumbing for :mod:`fedgate.congestion.quic_workers`; no asyncio):

1. :func:`reuseport_group` binds ``n`` UDP sockets to one address, in order, and attaches a classic
   BPF program to the group. The kernel then hands each datagram to socket
   ``dcid[0] % n``, where ``dcid[0]`` is the first byte of the QUIC destination connection id
   (offset 1 in a short header, offset 6 in a long one; offsets count from the UDP payload).
2. Worker ``k`` of a group makes every connection id it issues start with the byte ``k``
   (:func:`prefix_connection_ids`), so a peer's packets reach the worker that holds its
   connection whatever address they come from: after a NAT rebinding or a migration too, which
   plain SO_REUSEPORT (a hash of the 4-tuple) would send to a worker that does not know them.
3. A client's first Initial carries a connection id the client chose at random: it lands on an
   arbitrary worker, deterministically (its retransmissions land on the same one). That worker
   answers with its own connection id, and from then on the client addresses it.
4. The group's order is fixed by the order of binding; the sockets must stay open in the process
   that created them (the gateway), so that a restarted worker gets its old socket, and place, back.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from typing import Any

__all__ = ["K_SO_ATTACH_REUSEPORT_CBPF", "cid_steering_program", "prefix_connection_ids", "reuseport_group"]

K_SO_ATTACH_REUSEPORT_CBPF = 51  # linux/asm-generic/socket.h
K_MAX_GROUP = 256  # the steering key is one byte

# classic BPF opcodes (linux/bpf_common.h)
_LD_B_ABS = 0x00 | 0x10 | 0x20
_JMP_JSET_K = 0x05 | 0x40 | 0x00
_JMP_JA = 0x05 | 0x00
_ALU_MOD_K = 0x04 | 0x90 | 0x00
_RET_A = 0x06 | 0x10


def cid_steering_program(n: int) -> list[tuple[int, int, int, int]]:
    """The cBPF program of rule 1, as (code, jt, jf, k) instructions."""
    if not 1 <= n <= K_MAX_GROUP:
        raise ValueError(f"a steering group has 1 to {K_MAX_GROUP} sockets, not {n}")
    return [
        (_LD_B_ABS, 0, 0, 0),  # A = first byte (header form)
        (_JMP_JSET_K, 0, 2, 0x80),  # long header? then next, else skip to the short-header load
        (_LD_B_ABS, 0, 0, 6),  # long: A = DCID[0] (after flags, version, DCID length)
        (_JMP_JA, 0, 0, 1),
        (_LD_B_ABS, 0, 0, 1),  # short: A = DCID[0]
        (_ALU_MOD_K, 0, 0, n),
        (_RET_A, 0, 0, 0),  # the index of the socket in the group
    ]


def _attach(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    code = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, K_SO_ATTACH_REUSEPORT_CBPF, fprog)


def reuseport_group(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` UDP sockets bound to (host, port) in order, steered by connection id (rule 1).

    ``port`` 0 picks a free port for the first and binds the others to it. Raises OSError (the
    caller names the endpoint) when the address cannot be bound or the kernel refuses the program.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    family, addr = infos[0][0], infos[0][4]
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(addr)
            if not addr[1]:
                addr = (addr[0], sock.getsockname()[1], *addr[2:])
        _attach(sockets[0], cid_steering_program(n))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def prefix_connection_ids(connection: Any, prefix: int) -> None:
    """Make an aioquic server connection's connection ids start with ``prefix`` (rule 2).

    Call from the server's ``create_protocol``, before the connection is registered or sends. aioquic
    1.7.2 internals: ``_host_cids``, ``host_cid``, ``_local_initial_source_connection_id`` and
    ``_replenish_connection_ids``.
    """
    first = bytes([prefix])
    for entry in connection._host_cids:
        entry.cid = first + entry.cid[1:]
    connection.host_cid = connection._host_cids[0].cid
    connection._local_initial_source_connection_id = connection.host_cid  # a transport parameter
    original = connection._replenish_connection_ids

    def replenish() -> None:
        original()
        for entry in connection._host_cids:
            if not entry.was_sent and entry.cid[:1] != first:
                entry.cid = first + entry.cid[1:]

    setattr(connection, "_replenish_connection_ids", replenish)  # noqa: B010 (instance-level hook)
