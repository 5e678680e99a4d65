"""``fedgate bench proxy``: push->pop through two gateways on loopback, next to one gateway (no hop).

Starts real gateway processes (``python -m fedgate run``) with durable SQLite stores in a temporary
directory, then drives them with the OSX queue client the way FATE workers do: ``--concurrency``
pushers into gateway A, as many pollers popping the same topic (at A for the no-hop baseline, at B
for the hop). Each payload carries its send time; latency is push start -> pop return.
Prints throughput (MB/s, msg/s) and p50/p99 latency per size and path, and the ratio hop/no-hop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import pickle
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

__all__ = ["K_AUDIT_MODES", "main"]

K_AUDIT_MODES = {  # --audit MODE: the gateways' [audit] section
    "off": "[audit]\nenabled = false\n",
    "chain": "[audit]\nenabled = true\nledger = false\n",
    "on": "[audit]\nenabled = true\nledger = true\n",
    "acked": "[audit]\nenabled = true\nledger = true\nledger_ack_after_commit = true\n",
}
K_SIZES = {"1KiB": 1024, "1MiB": 1024 * 1024}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class _Result:
    path: str
    size: int
    messages: int
    seconds: float
    latencies: tuple[float, ...]

    @property
    def mb_per_s(self) -> float:
        return self.messages * self.size / self.seconds / 1e6

    @property
    def msg_per_s(self) -> float:
        return self.messages / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _write_gateway(
    root: pathlib.Path, parties: list[str], routes: dict[str, object], *, front: int, link: int, audit: str
) -> pathlib.Path:
    gw = root / parties[0]
    gw.mkdir(parents=True)
    (gw / "routes.json").write_text(json.dumps({"self_party": parties, "route_table": routes}))
    (gw / "fedgate.toml").write_text(
        f"[gateway]\nparty_ids = {json.dumps(parties)}\n[front]\nlisten = \"127.0.0.1:{front}\"\n"
        f"[link]\nlisten = \"127.0.0.1:{link}\"\ninsecure = true\nquic = false\n"
        f"[store]\npath = \"{gw / 'fedgate.db'}\"\nmin_free_bytes = 0\n[metrics]\nlisten = \"\"\n"
        + K_AUDIT_MODES[audit] +
        f"[log]\nlevel = \"warning\"\n[routes]\nfile = \"{gw / 'routes.json'}\"\n"
    )
    return gw / "fedgate.toml"


@contextlib.contextmanager
def _gateways(root: pathlib.Path, *, audit: str) -> Iterator[tuple[int, int, Callable[[str], None]]]:
    """Gateway A (party 9999) and gateway B (party 10000). Yields A's and B's front ports and a function
    that switches A's route to 10000 between the OSX gRPC hop and the fedgate TCP link (a live reload)."""
    a_front, a_link, b_front, b_link = (_free_port() for _ in range(4))
    endpoints = {"grpc": {"ip": "127.0.0.1", "port": b_front, "transport": "grpc"},
                 "tcp": {"ip": "127.0.0.1", "port": b_link, "transport": "tcp"}}
    b_config = _write_gateway(root, ["10000"], {"9999": {"default": [{"ip": "127.0.0.1", "port": a_link,
                                                                        "transport": "tcp"}]}},
                              front=b_front, link=b_link, audit=audit)
    a_config = _write_gateway(root, ["9999"], {"10000": {"default": [endpoints["grpc"]]}},
                              front=a_front, link=a_link, audit=audit)

    def use(transport: str) -> None:
        table = {"self_party": ["9999"], "route_table": {"10000": {"default": [endpoints[transport]]}}}
        tmp = a_config.parent / "routes.json.new"
        tmp.write_text(json.dumps(table))
        tmp.replace(a_config.parent / "routes.json")  # atomic: the gateway sees old or new, never half
        time.sleep(2.0)  # the gateway polls the file every 0.5 s

    logs = [open(cfg.parent / "gateway.log", "wb") for cfg in (a_config, b_config)]  # noqa: SIM115
    procs = [
        subprocess.Popen([sys.executable, "-m", "fedgate", "run", "--config", str(cfg)], stdout=log, stderr=log)
        for cfg, log in zip((a_config, b_config), logs)
    ]
    try:
        for port in (a_front, b_front):
            _wait_port(port)
        yield a_front, b_front, use
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
            text = pathlib.Path(log.name).read_text(errors="replace").strip()
            if text:
                print(f"--- {log.name} (last lines)\n" + "\n".join(text.splitlines()[-15:]), file=sys.stderr)


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"bench proxy: gateway on port {port} did not start")


async def _run_case(
    push_port: int, pop_port: int, *, target: str, path: str, size: int, count: int, concurrency: int
) -> _Result:
    from fedgate.proxy.osx_client import OsxQueueClient
    from fedgate.proxy.protos import osx_pb2

    session = f"bench-{path}-{size}-{time.monotonic_ns()}"
    topic = f"{session}-guest-9999-host-{target}-x"
    pusher = OsxQueueClient(f"127.0.0.1:{push_port}", party="9999")
    popper = OsxQueueClient(f"127.0.0.1:{pop_port}", party=target)
    # A FATE-shaped message: OSX Message(msgId, JSON head, body = inline mode byte + protocol-4 pickle).
    body = b"\x00" + pickle.dumps(os.urandom(max(0, size - 64)), protocol=4)
    latencies: list[float] = []
    todo = list(range(count))

    async def push_loop() -> None:
        while todo:
            i = todo.pop()  # one message per iteration, shared by the pushers
            head = json.dumps({"message_id": "x", "correlation_id": f"bench-{i}", "app_id": target,
                               "content_type": "text/plain", "sent": time.perf_counter()}).encode()
            payload = osx_pb2.Message(msgId="", head=head, body=body).SerializeToString()
            await pusher.push(session=session, topic=topic, target=target, payload=payload)

    async def pop_loop(n: int) -> None:
        for _ in range(n):
            payload = await popper.pop(session=session, topic=topic, timeout=120)
            if payload is None:
                raise SystemExit("bench proxy: a pop timed out; messages were lost or the gateway stalled")
            sent = json.loads(osx_pb2.Message.FromString(payload).head)["sent"]
            latencies.append(time.perf_counter() - sent)

    share = [count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)]
    started = time.perf_counter()
    await asyncio.gather(*(push_loop() for _ in range(concurrency)), *(pop_loop(n) for n in share))
    seconds = time.perf_counter() - started
    await pusher.release(session=session)
    await pusher.aclose()
    await popper.aclose()
    return _Result(path, size, count, seconds, tuple(latencies))


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedgate bench proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--count-1k", type=int, default=4000, help="1 KiB messages per path (default: %(default)s)")
    parser.add_argument("--count-1m", type=int, default=300, help="1 MiB messages per path (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16, help="pushers and poppers (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--audit", nargs="?", choices=list(K_AUDIT_MODES), default="off", const="on",
                        help="the audit in both gateways: off (default), chain (filters only), on (chain and "
                        "ledger; what --audit alone means), acked (on, and a message acknowledged only once its "
                        "ledger record is committed); payloads are FATE-shaped, the default policy passes them")
    args = parser.parse_args(argv)

    results: list[_Result] = []
    with (tempfile.TemporaryDirectory(prefix="fedgate-bench-") as tmp,
          _gateways(pathlib.Path(tmp), audit=args.audit) as (a, b, use)):
        for path, pop_port, target, transport in (("one gateway", a, "9999", ""), ("two, grpc hop", b, "10000", "grpc"),
                                                  ("two, tcp link", b, "10000", "tcp")):
            if transport:
                use(transport)
            for label, size in K_SIZES.items():
                count = args.count_1k if size == 1024 else args.count_1m
                result = asyncio.run(
                    _run_case(a, pop_port, target=target, path=path, size=size, count=count,
                              concurrency=args.concurrency)
                )
                results.append(result)
                print(
                    f"  {label:>5} {path:<13} {result.mb_per_s:8.1f} MB/s {result.msg_per_s:9.0f} msg/s "
                    f"p50 {result.pct(0.5):7.2f} ms  p99 {result.pct(0.99):7.2f} ms",
                    flush=True,
                )
    results.sort(key=lambda r: r.size)
    print("\nsize   path           MB/s     msg/s    p50 ms   p99 ms   vs one gateway")
    for r in results:
        base = next(x for x in results if x.size == r.size and x.path == "one gateway")
        print(
            f"{r.size:>7} {r.path:<13} {r.mb_per_s:7.1f} {r.msg_per_s:9.0f} {r.pct(0.5):8.2f} {r.pct(0.99):8.2f}"
            f"   {r.msg_per_s / base.msg_per_s:5.2f}x"
        )
    print(
        f"(median latency over all: {statistics.median(x for r in results for x in r.latencies) * 1000:.2f} ms; "
        f"{os.cpu_count()} CPUs, client and both gateways on this machine)"
    )
    if args.json:
        pathlib.Path(args.json).write_text(
            json.dumps(
                [
                    {
                        "path": r.path,
                        "size": r.size,
                        "messages": r.messages,
                        "seconds": r.seconds,
                        "mb_per_s": r.mb_per_s,
                        "msg_per_s": r.msg_per_s,
                        "p50_ms": r.pct(0.5),
                        "p99_ms": r.pct(0.99),
                    }
                    for r in results
                ],
                indent=2,
            )
        )
    return 0
