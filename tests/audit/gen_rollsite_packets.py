"""Push FATE object bytes with the real EggRoll 3.0.0 rollsite client; record every Packet it sends.

Runs INSIDE the eggroll test virtualenv (``.test-venvs/eggroll/bin/python``, Python 3.10); it never
imports fedgate. For every ``INDIR/<name>.obj`` (FATE object bytes: mode byte + pickle, as the
pyfate client produced them) it calls eggroll's own
``RollSite(name, tag, ctx).push_bytes(obj, parties=[("host", "10000")])`` against a recording
``DataTransferService`` on 127.0.0.1 (eggroll's generated stubs) and writes each received
``Packet`` to ``OUTDIR/NNN.bin``, listed in ``OUTDIR/manifest.json`` with its object name. The chunk
size is eggroll's default (100,000-byte values in bin batches, 10 batches per stream).

Usage: python gen_rollsite_packets.py INDIR OUTDIR   (prints ``RESULT {json}`` last; exit 0 on success)
"""

from __future__ import annotations

import importlib
import json
import pathlib
import sys
import threading
from concurrent import futures
from typing import Any

K_SESSION = "audit-rs"
K_FAIL_FAST = {
    "eggroll.rollsite.push.max.retry": 1,
    "eggroll.rollsite.push.long.retry": 0,
    "eggroll.rollsite.push.stream.timeout.sec": 60,
}


def _mod(name: str) -> Any:
    return importlib.import_module(name)


class _Ctx:
    """The parts of eggroll's RollSiteContext that a push uses."""

    def __init__(self, port: int) -> None:
        self.config = _mod("eggroll.config").Config().load_default()
        self.rp_ctx = None
        self.role = "guest"
        self.party_id = "9999"
        self.roll_site_session_id = K_SESSION
        self.proxy_endpoint = _mod("eggroll.core.meta_model").ErEndpoint(host="127.0.0.1", port=port)
        self.pushing_latch = _mod("eggroll.federation._rollsite_context").CountDownLatch(0)


def main(argv: list[str]) -> int:
    indir, outdir = pathlib.Path(argv[1]), pathlib.Path(argv[2])
    outdir.mkdir(parents=True, exist_ok=True)
    grpc = _mod("grpc")
    proxy_pb2 = _mod("eggroll.core.proto.proxy_pb2")
    proxy_pb2_grpc = _mod("eggroll.core.proto.proxy_pb2_grpc")
    lock = threading.Lock()
    entries: list[dict[str, Any]] = []
    current = [""]

    class Servicer(proxy_pb2_grpc.DataTransferServiceServicer):  # type: ignore[misc, name-defined, unused-ignore]
        def push(self, request_iterator: Any, context: Any) -> Any:
            last = None
            for packet in request_iterator:
                with lock:
                    index = len(entries)
                    (outdir / f"{index:03d}.bin").write_bytes(packet.SerializeToString())
                    entries.append({"file": f"{index:03d}.bin", "object": current[0], "seq": packet.header.seq})
                last = packet.header
            return last or proxy_pb2.Metadata()

    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 1 << 30)])
    proxy_pb2_grpc.add_DataTransferServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        rollsite = _mod("eggroll.federation._rollsite")
        ctx = _Ctx(port)
        for path in sorted(indir.glob("*.obj")):
            current[0] = path.stem
            rs = rollsite.RollSite(path.stem, "tag-0", ctx, options=dict(K_FAIL_FAST))
            for f in rs.push_bytes(path.read_bytes(), parties=[("host", "10000")], options=dict(K_FAIL_FAST)):
                f.result(timeout=120)
    finally:
        server.stop(None)
    (outdir / "manifest.json").write_text(json.dumps(entries, indent=1))
    print("RESULT " + json.dumps({"ok": True, "packets": len(entries)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
