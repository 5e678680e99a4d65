"""The ``fedgate`` command line.

Only :func:`main` exits. Subcommands import their parts lazily, so ``fedgate config check`` does
not load gRPC and ``fedgate run`` does not load the benchmark tools.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import pathlib
import pickle
import pickletools
import sys
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fedgate import __version__
from fedgate.errors import FedgateError

__all__ = ["main"]

# Subcommands implemented by the parts, as "module:function" taking argv and returning an exit code.
K_DELEGATED: dict[str, tuple[str, str]] = {
    "route": ("fedgate.proxy.route_reload:main_route", "check a route table or explain a lookup"),
    "certs": ("fedgate.proxy.certs:main", "create a small CA and per-party certificates"),
    "doctor": ("fedgate.proxy.doctor:main", "explain step by step whether a party is reachable"),
    "audit": ("fedgate.audit.cli:main", "verify, export or reconcile the tamper-evident ledger"),
}
K_BENCH: dict[str, tuple[str, str]] = {
    "proxy": ("fedgate.bench.proxy:main", "push->pop through two gateways vs one, 1 KiB and 1 MiB"),
    "wan": ("fedgate.bench.wan:main", "goodput through an emulated lossy, long link: kernel TCP vs fedgate"),
    "link": ("fedgate.proxy.link_bench:main", "link throughput vs raw TLS over TCP on loopback"),
    "he": ("fedgate.compute.bench:main", "Paillier kops per op: fedgate backends vs phe and fate_utils"),
    "rdma": ("fedgate.rdma.bench:main", "RDMA message rate and bandwidth vs TCP (real RDMA hosts)"),
    "cc": ("fedgate.congestion.sim_bench:main", "congestion controllers on the seed rows in a virtual-time simulator"),
    "audit": ("fedgate.bench.audit:main", "gateway CPU per message of the audit chain and ledger on bench proxy"),
}


def _load(target: str) -> Callable[[Sequence[str]], int]:
    module_name, _, func = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"fedgate: this command is unavailable: {exc}") from exc
    fn: Callable[[Sequence[str]], int] = getattr(module, func)
    return fn


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


# -- run ------------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from fedgate.app import Gateway
    from fedgate.config import load_config
    from fedgate.logs import setup_logging

    config = load_config(args.config)
    setup_logging(config.log)

    async def run() -> int:
        await Gateway(config).run()
        return 0

    return _run_async(run())


# -- config ---------------------------------------------------------------------------------------


def _cmd_config(args: argparse.Namespace) -> int:
    from fedgate.config import load_config
    from fedgate.configtree import dump

    config = load_config(args.file)
    if args.action == "show":
        print(json.dumps(dump(config), indent=2))
    else:
        print(f"{args.file}: OK (gateway {config.display_name}, parties {', '.join(config.gateway.party_ids)})")
    return 0


# -- send / recv ----------------------------------------------------------------------------------


def wrap_bytes(data: bytes) -> bytes:
    """FATE object bytes holding ``data``: the inline mode byte and a protocol-4 pickle of a bytes value."""
    return b"\x00" + pickle.dumps(data, protocol=4)


def unwrap_bytes(body: bytes) -> bytes:
    """The inverse of :func:`wrap_bytes`, without unpickling: the opcodes are read, never run.

    Anything but exactly "one bytes value" is handed out unchanged.
    """
    if not body.startswith(b"\x00"):
        return body
    try:
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(body[1:])]
    except ValueError:
        return body
    names = [name for name, _ in ops if name not in ("PROTO", "FRAME", "MEMOIZE")]
    if len(names) == 2 and names[1] == "STOP" and names[0] in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8"):
        value = next(arg for name, arg in ops if name == names[0])
        if isinstance(value, bytes):
            return value
    return body


def _cmd_send(args: argparse.Namespace) -> int:
    from fedgate.proxy.osx_client import OsxQueueClient
    from fedgate.proxy.protos import osx_pb2

    data = sys.stdin.buffer.read() if args.file == "-" else pathlib.Path(args.file).read_bytes()
    # Shaped like a FATE object, so the audit chain judges it as it would a worker's push.
    head = json.dumps({"message_id": pathlib.Path(args.file).name, "correlation_id": "fedgate-send",
                       "app_id": args.to, "content_type": "text/plain"}).encode()
    message = osx_pb2.Message(msgId=uuid.uuid4().hex, head=head, body=wrap_bytes(data))

    async def send() -> int:
        client = OsxQueueClient(args.gateway, party=args.source)
        try:
            await client.push(session=args.session, topic=args.topic, target=args.to,
                              payload=message.SerializeToString(), timeout=args.timeout)
        finally:
            await client.aclose()
        print(f"sent {len(data)} bytes to party {args.to}, session {args.session}, topic {args.topic}",
              file=sys.stderr)
        return 0

    return _run_async(send())


def _cmd_recv(args: argparse.Namespace) -> int:
    from fedgate.proxy.osx_client import OsxQueueClient
    from fedgate.proxy.protos import osx_pb2

    async def recv() -> int:
        client = OsxQueueClient(args.gateway, party=args.party)
        try:
            payload = await client.pop(session=args.session, topic=args.topic, timeout=args.timeout)
        finally:
            await client.aclose()
        if payload is None:
            print(f"fedgate recv: nothing on topic {args.topic!r} within {args.timeout:g} s", file=sys.stderr)
            return 3
        body = payload
        try:
            message = osx_pb2.Message.FromString(payload)
            if message.msgId:
                body = unwrap_bytes(message.body)
        except Exception:  # not an OSX Message: hand the raw payload out
            pass
        if args.out == "-":
            sys.stdout.buffer.write(body)
            sys.stdout.buffer.flush()
        else:
            pathlib.Path(args.out).write_bytes(body)
        print(f"received {len(body)} bytes", file=sys.stderr)
        return 0

    return _run_async(recv())


# -- parser ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedgate", description="Message proxy for cross-party federated learning.")
    parser.add_argument("--version", action="version", version=f"fedgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the gateway")
    p.add_argument("--config", "-c", default="conf/fedgate.toml", help="fedgate.toml (default: %(default)s)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("config", help="check or show a configuration file")
    p.add_argument("action", choices=["check", "show"])
    p.add_argument("file")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("send", help="push a file to a party through a gateway (like a FATE worker)")
    p.add_argument("file", help="file to send, - for stdin")
    p.add_argument("--to", required=True, help="destination party id")
    p.add_argument("--from", dest="source", required=True, help="own party id")
    p.add_argument("--session", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--gateway", default="127.0.0.1:9370", help="own gateway's front (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds (default: %(default)s)")
    p.set_defaults(func=_cmd_send)

    p = sub.add_parser("recv", help="pop one message from a queue of a gateway (like a FATE worker)")
    p.add_argument("--party", required=True, help="own party id")
    p.add_argument("--session", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--gateway", default="127.0.0.1:9370", help="own gateway's front (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default: %(default)s)")
    p.add_argument("--out", "-o", default="-", help="output file, - for stdout")
    p.set_defaults(func=_cmd_recv)

    for name, (target, text) in K_DELEGATED.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("argv", nargs=argparse.REMAINDER)
        p.set_defaults(target=target, prog=f"fedgate {name}")

    p = sub.add_parser("bench", help="benchmarks: " + ", ".join(K_BENCH))
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (target, text) in K_BENCH.items():
        b = bench.add_parser(name, help=text, add_help=False)
        b.add_argument("argv", nargs=argparse.REMAINDER)
        b.set_defaults(target=target)
    return parser


def _delegated(argv: list[str]) -> tuple[str, list[str]] | None:
    """(target, rest) when ``argv`` names a command implemented by a part; its flags are its own."""
    if argv and argv[0] in K_DELEGATED:
        return K_DELEGATED[argv[0]][0], argv[1:]
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in K_BENCH:
        return K_BENCH[argv[1]][0], argv[2:]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    delegated = _delegated(arguments)
    args = _parser().parse_args(arguments) if delegated is None else None
    try:
        if delegated is not None:
            return _load(delegated[0])(delegated[1])
        assert args is not None
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except FedgateError as exc:
        logging.getLogger("fedgate").debug("command failed", exc_info=True)
        print(f"fedgate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # gRPC call failures from send/recv: say what the gateway answered, without a traceback.
        if type(exc).__name__ == "AioRpcError":
            code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
            print(f"fedgate: error: the gateway answered {code.name}: {details}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
