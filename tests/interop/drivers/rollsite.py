"""The real EggRoll 3.0.0 rollsite client: push an object in stream mode, or drain it back.

Runs INSIDE the eggroll test virtualenv (``.test-venvs/eggroll``, Python 3.10), as its own process;
it must never import fedgate. Rules of this file:

- ``push``: eggroll's own ``RollSite(name, tag, ctx).push_bytes(obj, parties=[(role, party)])``
  against a proxy, with a minimal stand-in for the RollSiteContext (config, proxy endpoint,
  session id, role, party id, push latch): no EggRoll cluster is needed to push.
- ``pull``: drains the packets a proxy stored for (session, name, tag) with
  ``DataTransferService.pull`` and decodes their bodies with eggroll's own bin-batch reader, then
  checks the reassembled bytes against the expected object.
- The object is FATE object bytes (mode byte 0 + a protocol-4 pickle of a dict holding ``--size``
  random bytes), a pure function of ``--size`` and ``--seed``; both sides rebuild it.
- One ``RESULT {json}`` line, last on stdout; exit status 0 only when ``ok``. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pickle
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

K_PULL_IDLE_MS = 3000  # milliseconds the proxy waits for more packets before ending a pull stream
K_FAIL_FAST = {
    # eggroll retries a failed stream 3 times, sleeping up to 300 s before the last: fail fast.
    "eggroll.rollsite.push.max.retry": 1,
    "eggroll.rollsite.push.long.retry": 0,
    "eggroll.rollsite.push.stream.timeout.sec": 60,
}


def _mod(name: str) -> Any:
    return importlib.import_module(name)


def _payload(size: int, seed: int, *, raw: bool = False) -> bytes:
    """FATE object bytes, as FATE's federation hands them to rollsite: mode byte 0 + pickle (protocol 4).

    A proxy's audit filter rejects bytes that are not FATE-framed, so the object must look real;
    ``raw`` gives plain random bytes instead (to see a rejection).
    """
    blob = random.Random(seed).randbytes(size)
    if raw:
        return blob
    return b"\x00" + pickle.dumps({"note": f"rollsite-{seed}", "blob": blob}, protocol=4)


class _Ctx:
    """The parts of eggroll's RollSiteContext that a push uses."""

    def __init__(self, args: argparse.Namespace) -> None:
        config = _mod("eggroll.config").Config().load_default()
        self.config = config
        self.rp_ctx = None
        self.role = args.src_role
        self.party_id = args.src_party
        self.roll_site_session_id = args.session
        self.proxy_endpoint = _mod("eggroll.core.meta_model").ErEndpoint(host=args.host, port=args.port)
        self.pushing_latch = _mod("eggroll.federation._rollsite_context").CountDownLatch(0)


def _push(args: argparse.Namespace) -> dict[str, Any]:
    rollsite = _mod("eggroll.federation._rollsite")
    ctx = _Ctx(args)
    rs = rollsite.RollSite(args.name, args.tag, ctx, options=dict(K_FAIL_FAST))
    obj = _payload(args.size, args.seed, raw=args.raw)
    futures = rs.push_bytes(obj, parties=[(args.dst_role, args.dst_party)], options=dict(K_FAIL_FAST))
    for f in futures:
        f.result(timeout=args.timeout)
    return {"ok": True, "bytes": len(obj), "latch": ctx.pushing_latch.count}


def _pull(args: argparse.Namespace) -> dict[str, Any]:
    grpc = _mod("grpc")
    proxy_pb2 = _mod("eggroll.core.proto.proxy_pb2")
    proxy_pb2_grpc = _mod("eggroll.core.proto.proxy_pb2_grpc")
    transfer_pb2 = _mod("eggroll.core.proto.transfer_pb2")
    transfer_pair = _mod("eggroll.computing.tasks.transfer.transfer_pair")

    header = transfer_pb2.RollSiteHeader(
        rollSiteSessionId=args.session,
        name=args.name,
        tag=args.tag,
        srcRole=args.src_role,
        srcPartyId=args.src_party,
        dstRole=args.dst_role,
        dstPartyId=args.dst_party,
    )
    request = proxy_pb2.Metadata(
        src=proxy_pb2.Topic(name=args.name, partyId=args.src_party, role=args.src_role),
        dst=proxy_pb2.Topic(name=args.tag, partyId=args.dst_party, role=args.dst_role),
        ext=header.SerializeToString(),
        conf=proxy_pb2.Conf(overallTimeout=K_PULL_IDLE_MS),
    )
    channel = grpc.insecure_channel(
        f"{args.host}:{args.port}",
        options=[("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)],
    )
    packets = list(proxy_pb2_grpc.DataTransferServiceStub(channel).pull(request, timeout=args.timeout))
    channel.close()

    headers = [transfer_pb2.RollSiteHeader.FromString(p.header.ext) for p in packets]
    bodies = [p.body.value for p in packets if p.body.value]
    pairs = sorted(transfer_pair.TransferPair.bin_batch_to_pair(bodies), key=lambda kv: int.from_bytes(kv[0], "big"))
    got = b"".join(v for _, v in pairs)
    want = _payload(args.size, args.seed, raw=args.raw)
    return {
        "ok": got == want,
        "bytes": len(got),
        "want_bytes": len(want),
        "packets": len(packets),
        "streams": len({h.streamSeq for h in headers}),
        "max_body": max((len(b) for b in bodies), default=0),
        "chunks": len(pairs),
        "data_types": sorted({h.dataType for h in headers}),
        "last_stage": headers[-1].stage if headers else "",
        "total_batches": headers[-1].totalBatches if headers else 0,
        "seqs": [p.header.seq for p in packets],
        "versions": sorted({p.header.version for p in packets}),
        "dst": sorted({f"{p.header.dst.role}:{p.header.dst.partyId}" for p in packets}),
    }


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="rollsite", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["push", "pull"])
    p.add_argument("--host", default="127.0.0.1", help="the proxy to push to / pull from")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--session", required=True, help="rollSiteSessionId")
    p.add_argument("--name", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--src-role", default="guest")
    p.add_argument("--src-party", required=True)
    p.add_argument("--dst-role", default="host")
    p.add_argument("--dst-party", required=True)
    p.add_argument("--size", type=int, default=350_000, help="object size in bytes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--raw", action="store_true", help="random bytes instead of a FATE-framed object")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds")
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("ROLLSITE_DRIVER_LOG", "WARNING"))

    start = time.monotonic()
    try:
        result = _push(args) if args.action == "push" else _pull(args)
        error = ""
    except Exception as exc:
        logging.getLogger("rollsite").exception("driver failed")
        result, error = {"ok": False}, f"{type(exc).__name__}: {exc}"
    result.update(driver="rollsite", action=args.action, error=error, elapsed_s=round(time.monotonic() - start, 3))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if result["ok"] and not error else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
