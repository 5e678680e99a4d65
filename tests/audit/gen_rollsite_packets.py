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

import argparse
import importlib
import importlib.util
import json
import pathlib
import sys
import threading
from concurrent import futures
from typing import Any

K_SESSION = "audit-rs"
K_DRIVER = pathlib.Path(__file__).resolve().parents[1] / "interop" / "drivers" / "rollsite.py"


def _mod(name: str) -> Any:
    return importlib.import_module(name)


def _driver() -> Any:
    """tests/interop/drivers/rollsite.py (same venv): its RollSiteContext stand-in and fail-fast options."""
    spec = importlib.util.spec_from_file_location("rollsite_driver", K_DRIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        driver = _driver()
        args = argparse.Namespace(src_role="guest", src_party="9999", session=K_SESSION, host="127.0.0.1", port=port)
        ctx = driver._Ctx(args)
        options = dict(driver.K_FAIL_FAST)
        for path in sorted(indir.glob("*.obj")):
            current[0] = path.stem
            rs = rollsite.RollSite(path.stem, "tag-0", ctx, options=dict(options))
            for f in rs.push_bytes(path.read_bytes(), parties=[("host", "10000")], options=dict(options)):
                f.result(timeout=120)
    finally:
        server.stop(None)
    (outdir / "manifest.json").write_text(json.dumps(entries, indent=1))
    print("RESULT " + json.dumps({"ok": True, "packets": len(entries)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
