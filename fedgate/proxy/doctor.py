"""``fedgate doctor PARTY``: can this gateway reach that party, and if not, where does it break?

Reads the gateway's own config and route table, explains the lookup, then probes every endpoint of
the route in order: for link endpoints (tcp, quic, rdma, auto) DNS, TCP, TLS + identity, the link
handshake, RTT and clock skew (:mod:`fedgate.proxy.link_doctor`); for OSX gRPC endpoints DNS, TCP,
gRPC channel readiness (with TLS when the endpoint asks for it). Exit status 0 when at least one
endpoint works, 1 otherwise, 2 for a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from fedgate.config import FedgateConfig, load_config
from fedgate.errors import ConfigError
from fedgate.proxy.dispatch import K_LINK_TRANSPORTS
from fedgate.proxy.link_doctor import DoctorStep, diagnose, reach_steps
from fedgate.proxy.route_reload import load_route_table
from fedgate.proxy.routing import Endpoint

__all__ = ["main"]



async def _grpc_steps(endpoint: Endpoint, timeout: float) -> list[DoctorStep]:
    import grpc
    import grpc.aio

    from fedgate.proxy.osx_client import OsxForwarder

    steps = await reach_steps(endpoint.host, endpoint.port, timeout=timeout)
    if not all(s.ok for s in steps):
        return steps
    forwarder = OsxForwarder(max_message_bytes=4 * 1024 * 1024, timeout=timeout)
    channel = forwarder._channel(endpoint)  # the very channel a forward would use
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
        what = "TLS" if endpoint.use_tls else "plain text"
        steps.append(DoctorStep("grpc", True, f"gRPC channel ready ({what})"))
    except (TimeoutError, grpc.RpcError) as exc:
        state = channel.get_state(try_to_connect=False)
        hint = " (TLS handshake? check caFile/certChainFile/privateKeyFile)" if endpoint.use_tls else ""
        steps.append(DoctorStep("grpc", False, f"gRPC channel not ready within {timeout:g} s, state {state.name}"
                                f"{hint}: {exc or 'timeout'}"))
    finally:
        await forwarder.aclose()
    return steps


async def _probe(config: FedgateConfig, endpoint: Endpoint, party: str, timeout: float) -> list[DoctorStep]:
    if endpoint.transport not in K_LINK_TRANSPORTS:
        return await _grpc_steps(endpoint, timeout)
    from fedgate.proxy.links import choose_link_transport, close_carrier, make_carrier

    tls = config.tls
    client = None
    if tls.ca_file and tls.cert_file and tls.key_file:
        from fedgate.proxy.certs import client_context

        client = client_context(tls.ca_file, tls.cert_file, tls.key_file)
    elif not config.link.insecure:
        return [DoctorStep("tls", False, "links need [tls] ca_file, cert_file and key_file in the config "
                                         "(or link.insecure = true in a trusted lab)")]
    name, why = choose_link_transport(config, endpoint)
    if endpoint.transport == "auto":
        print(f"  transport auto: {name} ({why})")
    carrier = make_carrier(config, name)
    try:
        return await diagnose(host=endpoint.host, port=endpoint.port, party=party,
                              local_party=config.gateway.party_ids[0], tls=client, carrier=carrier, timeout=timeout)
    finally:
        await close_carrier(carrier)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedgate doctor", description=__doc__.splitlines()[0])
    parser.add_argument("party", help="the party to reach")
    parser.add_argument("--role", default="default", help="the role to look up (default: %(default)s)")
    parser.add_argument("--config", "-c", default="conf/fedgate.toml", help="gateway config (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per step (default: %(default)s)")
    args = parser.parse_args(list(argv))
    try:
        config = load_config(args.config)
        table = load_route_table(config.routes.file)
    except ConfigError as exc:
        print(f"fedgate doctor: {exc}", file=sys.stderr)
        return 2
    print(f"route table {config.routes.file}:")
    if args.party in config.gateway.party_ids or table.is_local(args.party, config.gateway.party_ids):
        print(f"  party {args.party} is served by this gateway: messages to it are stored locally")
        return 0
    route, steps = table.explain(args.party, args.role)
    for line in steps:
        print(f"  {line}")
    if route is None:
        print(f"party {args.party} has no route: add it to {config.routes.file}", file=sys.stderr)
        return 1
    working = 0
    for endpoint in route.endpoints:
        print(f"\nendpoint {endpoint.describe()}:")
        results = asyncio.run(_probe(config, endpoint, args.party, args.timeout))
        for step in results:
            print(f"  [{'ok' if step.ok else 'FAIL'}] {step.name:<9} {step.detail}")
        working += all(s.ok for s in results)
    print(f"\n{working} of {len(route.endpoints)} endpoint(s) of party {args.party} reachable")
    return 0 if working else 1
