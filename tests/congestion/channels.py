"""Helpers for the tests that move bytes over QUIC channels (in process or through worker processes)."""

from __future__ import annotations

import ssl

from fedgate.proxy.carrier import ByteChannel


def mutual_tls() -> ssl.SSLContext:
    """A ``tls`` argument for the QUIC carriers: only its presence matters (mutual TLS with the identity)."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


async def collect(channel: ByteChannel) -> bytes:
    """Everything the channel receives until its clean end."""
    out = bytearray()
    while True:
        data = await channel.receive()
        if not data:
            return bytes(out)
        out.extend(data)
