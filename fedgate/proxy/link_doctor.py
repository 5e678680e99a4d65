"""Reachability of a peer gateway, step by step: the building block of ``fedgate doctor PARTY``.

Rules of this module:

1. Steps run in order (dns, tcp, connect, identity, handshake, rtt, clock); a failed step stops the
   rest, and its ``detail`` says what was tried and what came back, in words a person can act on.
2. Nothing but a probe is sent: a HELLO with the capability ``probe`` (the listener checks it like a
   link but does not let it replace the live one), one PING and a CLOSE. No message moves.
3. The route lookup is the caller's: :func:`diagnose` takes the endpoint, the transport's carrier and
   TLS context, so ``fedgate doctor`` can run it for every endpoint of a party's route.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedgate.errors import FedgateError
from fedgate.proxy.carrier import ByteChannel, Carrier
from fedgate.proxy.certs import client_context
from fedgate.proxy.link_core import LinkParams
from fedgate.proxy.link_events import ConnectionTerminated, HandshakeCompleted, LinkEvent, RttMeasured
from fedgate.proxy.link_listener import K_PROBE_CAPABILITY
from fedgate.proxy.link_send import LinkSenderCore
from fedgate.proxy.tcp_carrier import TcpCarrier

__all__ = ["DoctorStep", "diagnose", "format_steps", "main", "reach_steps"]

K_MAX_SKEW = 5.0  # seconds of clock difference tolerated on top of the round trip


@dataclass(frozen=True, slots=True)
class DoctorStep:
    name: str
    """``dns``, ``tcp``, ``connect``, ``identity``, ``handshake``, ``rtt`` or ``clock``."""
    ok: bool
    detail: str


async def reach_steps(host: str, port: int, *, timeout: float, tcp: bool = True) -> list[DoctorStep]:
    """The ``dns`` step, then (with ``tcp``) whether the TCP port accepts connections; stops at a failure."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except (OSError, TimeoutError) as exc:
        return [DoctorStep("dns", False, f"cannot resolve {host!r}: {exc}")]
    steps = [DoctorStep("dns", True, f"{host} resolves to {', '.join(sorted({str(i[4][0]) for i in infos}))}")]
    if tcp:
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(host, port)
            writer.transport.abort()
            steps.append(DoctorStep("tcp", True, f"TCP port {port} accepts connections"))
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            steps.append(DoctorStep("tcp", False, f"TCP connection to {host}:{port} failed: {reason} "
                                                  "(gateway down, firewall?)"))
    return steps


async def diagnose(
    *, host: str, port: int, party: str, local_party: str, tls: ssl.SSLContext | None,
    carrier: Carrier | None = None, server_hostname: str | None = None, timeout: float = 5.0,
    max_skew_s: float = K_MAX_SKEW,
) -> list[DoctorStep]:
    """Check that the gateway of ``party`` at ``host:port`` can be reached and speaks the link."""
    carrier = carrier or TcpCarrier()
    steps = await reach_steps(host, port, timeout=timeout, tcp=carrier.name == "tcp")
    if not all(s.ok for s in steps):
        return steps

    def step(name: str, ok: bool, detail: str) -> bool:
        steps.append(DoctorStep(name, ok, detail))
        return ok

    try:
        channel = await carrier.connect(host, port, tls=tls, server_hostname=server_hostname, timeout=timeout)
    except FedgateError as exc:
        what = "TLS 1.3 with client certificate" if tls else "plain-text"
        step("connect", False, f"{carrier.name} {what} connection failed: {exc}")
        return steps
    step("connect", True, f"{carrier.name} connection open ({'mTLS' if tls else 'plain text, no identity'})")
    try:
        await _link_steps(channel, party, local_party, timeout, max_skew_s, step)
    finally:
        await channel.aclose()
    return steps


async def _link_steps(
    channel: ByteChannel, party: str, local_party: str, timeout: float, max_skew_s: float,
    step: Callable[[str, bool, str], bool],
) -> None:
    if channel.peer_party is not None and not step(
        "identity", channel.peer_party == party,
        f"the certificate says party {channel.peer_party!r}"
        + ("" if channel.peer_party == party else f", but the route says {party!r}"),
    ):
        return
    loop = asyncio.get_running_loop()
    params = LinkParams(local_party, capabilities=frozenset({"resume", "credit", K_PROBE_CAPABILITY}))
    core = LinkSenderCore(params, now=loop.time(), expected_peer=party, authenticated_peer=channel.peer_party,
                          wall_time=time.time())

    async def until(want: type[HandshakeCompleted] | type[RttMeasured]) -> LinkEvent | None:
        async with asyncio.timeout(timeout):
            while True:
                for data in core.data_to_send():
                    await channel.send(data)
                events = core.receive_data(await channel.receive(), now=loop.time())
                events += core.handle_timer(now=loop.time())  # sends the first PING once open
                for event in events:
                    if isinstance(event, want | ConnectionTerminated):
                        return event
        return None

    # HELLOs cross, so the peer's HELLO does not mean it accepted ours: a PING answered does.
    try:
        hello = await until(HandshakeCompleted)
        received_at = time.time()
        answer = await until(RttMeasured) if isinstance(hello, HandshakeCompleted) else hello
    except (TimeoutError, OSError) as exc:
        step("handshake", False, f"no link answer within {timeout} s ({exc!r}): not a fedgate link listener?")
        return
    if not isinstance(hello, HandshakeCompleted) or not isinstance(answer, RttMeasured):
        reason = answer.reason if isinstance(answer, ConnectionTerminated) else "no answer"
        step("handshake", False, f"link handshake refused: {reason}")
        return
    step("handshake", True, f"party {hello.peer_party} speaks link version {hello.version}, "
                            f"chunk {hello.chunk_bytes} bytes, capabilities {', '.join(sorted(hello.capabilities))}")
    rtt = answer.rtt
    step("rtt", True, f"round trip {rtt * 1000:.1f} ms")
    if hello.peer_wall_time is None:
        step("clock", True, "the peer did not send its clock; skew not checked")
    else:
        skew = hello.peer_wall_time - received_at
        step("clock", abs(skew) <= max_skew_s + rtt,
             f"peer clock is {skew:+.3f} s from ours (tolerated: {max_skew_s} s plus the round trip)")
    core.close(now=loop.time(), code="normal", reason="fedgate doctor probe done")
    for data in core.data_to_send():
        await channel.send(data)


def format_steps(steps: Sequence[DoctorStep]) -> str:
    return "\n".join(f"{'ok  ' if s.ok else 'FAIL'} {s.name:<9} {s.detail}" for s in steps)


def main(argv: Sequence[str]) -> int:
    """``fedgate link probe HOST:PORT --party P``: run :func:`diagnose` against one endpoint."""
    parser = argparse.ArgumentParser(prog="fedgate link probe", description=__doc__.splitlines()[0])
    parser.add_argument("endpoint", help="host:port of the peer gateway's link listener")
    parser.add_argument("--party", required=True, help="the party id the route says lives there")
    parser.add_argument("--local-party", required=True, help="our party id (sent in HELLO)")
    parser.add_argument("--ca", help="CA bundle (PEM); with --cert and --key for mTLS")
    parser.add_argument("--cert", help="our certificate (PEM)")
    parser.add_argument("--key", help="our private key (PEM)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per step (default 5)")
    args = parser.parse_args(list(argv))
    host, _, port_text = args.endpoint.rpartition(":")
    if not host or not port_text.isdigit():
        parser.error(f"expected host:port, got {args.endpoint!r}")
    tls = client_context(args.ca, args.cert, args.key) if args.ca and args.cert and args.key else None
    steps = asyncio.run(diagnose(host=host.strip("[]"), port=int(port_text), party=args.party,
                                 local_party=args.local_party, tls=tls, timeout=args.timeout))
    print(format_steps(steps))
    ok = all(s.ok for s in steps)
    if not ok:
        print(f"party {args.party} at {args.endpoint} is NOT reachable over the link", file=sys.stderr)
    return 0 if ok else 1
