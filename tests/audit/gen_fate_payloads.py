"""Write the exact bytes a real FATE 2.2 guest pushes to its OSX proxy, for the audit tests.

Runs INSIDE the pyfate test virtualenv (``.test-venvs/pyfate/bin/python``), as its own process; it
never imports fedgate. It starts a tiny recording OSX ``PrivateTransferTransport`` server on
127.0.0.1 (FATE's own generated stubs), points a real ``OSXFederation`` guest context at it and
``ctx.hosts.put()``s a fixed set of objects. Every ``PushInbound`` is written to the output
directory as ``NNN.bin`` (the ``payload`` bytes: a serialized ``org.ppc.ptp.Message``) and listed
in ``manifest.json`` with its topic, session and party metadata and the object it belongs to.

Objects (all from guest 9999 to host 10000, session ``audit-gen``):

- ``pk_1024``, ``pk_2048``: public Paillier ciphers (``cipher.to_public()``) of real keys;
- ``pk_128``, ``pk_2025``: forged keys made with ``fate_utils`` directly, skipping FATE's minimum
  key-size check (what a tampered party would send);
- ``enc_1024``, ``enc_2048``: encrypted tensors (PHETensor) under those keys;
- ``pk_ou_1024``, ``enc_ou_1024``: the same with an OU key (``fate_utils.ou``);
- ``plain_ok`` (values in [0, 1)), ``plain_range`` (feature 2 holds 1e6), ``plain_nan`` (feature 1
  holds NaN), ``plain_empty`` (16 rows, 0 features), ``plain_norows`` (0 rows, 4 features), and
  ``numpy_ok`` (a numpy array, FATE's other safetensors path);
- ``mid_ok`` and ``mid_range``: 576 kB inline objects (several rollsite chunks); ``mid_range`` holds
  -3.0 in its last row;
- ``big_ok`` and ``big_range``: objects over FATE's 1 MiB limit (split into a slice table plus a
  header); ``big_range`` has a value of 1e6 in its last row, far past the first slice.

Usage: python gen_fate_payloads.py OUTDIR   (prints ``RESULT {json}`` last; exit 0 on success)
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from typing import Any

K_SESSION = "audit-gen"
K_GUEST = ("guest", "9999")
K_HOST = ("host", "10000")
K_BIG_ROWS = 40_000  # rows of 8 float64 features: 2.56 MB, split by FATE (limit 1 MiB)
K_MID_ROWS = 9_000  # rows of 8 float64 features: 576 kB, inline (rollsite sends it in 6 chunks)


def _serve(outdir: pathlib.Path, port_file: pathlib.Path) -> None:
    """The recording OSX server (its own process: FATE's standalone computing forks workers)."""
    import grpc
    from fate.arch.federation.backends.osx import osx_pb2, osx_pb2_grpc  # type: ignore[import-not-found, unused-ignore]

    lock = threading.Lock()
    count = [0]

    class Servicer(osx_pb2_grpc.PrivateTransferTransportServicer):  # type: ignore[misc, unused-ignore]
        def push(self, request: Any, context: Any) -> Any:
            md = {k: v for k, v in context.invocation_metadata()}
            msg = osx_pb2.Message.FromString(request.payload)
            head = json.loads(msg.head) if msg.head else {}
            with lock:
                index = count[0]
                count[0] += 1
                (outdir / f"{index:03d}.bin").write_bytes(request.payload)
                meta = {
                    "file": f"{index:03d}.bin",
                    "topic": request.topic,
                    "session": md.get("x-ptp-session-id", ""),
                    "src_party": md.get("x-ptp-from-node-id", ""),
                    "dst_party": md.get("x-ptp-target-node-id", ""),
                    "message_id": head.get("message_id", ""),
                    "content_type": head.get("content_type", ""),
                    "size": len(request.payload),
                }
                (outdir / f"{index:03d}.json").write_text(json.dumps(meta))
            return osx_pb2.TransportOutbound(code="E0000000000", message="ok")

    server = grpc.server(
        futures.ThreadPoolExecutor(8),
        options=[("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)],
    )
    osx_pb2_grpc.add_PrivateTransferTransportServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_file.write_text(str(port))
    sys.stdin.read()  # serve until the parent closes our stdin
    server.stop(None)


def _bincode(values: list[int]) -> bytes:
    out = b""
    for v in values:
        digits = format(v, "x").encode()
        out += (16).to_bytes(4, "little") + len(digits).to_bytes(8, "little") + digits
    return out


def _cipher(bits: int) -> Any:
    """A PHE cipher of ``bits``, built the way ``ctx.cipher.phe.setup`` does but without its size check.

    fate_utils cannot generate odd sizes (2025 panics), so such a key is forged: a 2048-bit key
    whose state (n, n^2, n+1 in bincode) is overwritten with a random odd ``bits``-bit n.
    """
    import random

    from fate.arch.context._cipher import PHECipher  # type: ignore[import-not-found, unused-ignore]
    from fate.arch.protocol.phe.paillier import evaluator, keygen  # type: ignore[import-not-found, unused-ignore]
    from fate.arch.tensor.phe import PHETensorCipher  # type: ignore[import-not-found, unused-ignore]

    sk, pk, coder = keygen(bits if bits % 2 == 0 else bits + 23)
    if bits % 2:
        n = random.Random(bits).getrandbits(bits) | (1 << (bits - 1)) | 1
        pk.pk.__setstate__(list(_bincode([n, n * n, n + 1])))
    tensor_cipher = PHETensorCipher.from_raw_cipher(pk, coder, sk, evaluator)
    return PHECipher("paillier", bits, pk, sk, evaluator, coder, tensor_cipher, True, True, True)


def _ou_cipher(bits: int) -> Any:
    """An OU cipher, built as ``ctx.cipher.phe.setup({"kind": "ou"})`` does."""
    from fate.arch.context._cipher import PHECipher  # type: ignore[import-not-found, unused-ignore]
    from fate.arch.protocol.phe.ou import evaluator, keygen  # type: ignore[import-not-found, unused-ignore]
    from fate.arch.tensor.phe import PHETensorCipher  # type: ignore[import-not-found, unused-ignore]

    sk, pk, coder = keygen(bits)
    tensor_cipher = PHETensorCipher.from_raw_cipher(pk, coder, sk, evaluator)
    return PHECipher("ou", bits, pk, sk, evaluator, coder, tensor_cipher, False, False, True)


def _objects() -> list[tuple[str, Any]]:
    import numpy as np
    import torch  # type: ignore[import-not-found, unused-ignore]

    gen = torch.Generator().manual_seed(7)
    ok = torch.rand(16, 4, generator=gen, dtype=torch.float64)
    rng = ok.clone()
    rng[5, 2] = 1e6
    nan = ok.clone()
    nan[3, 1] = float("nan")
    big_ok = torch.rand(K_BIG_ROWS, 8, generator=gen, dtype=torch.float64)
    big_range = big_ok.clone()
    big_range[K_BIG_ROWS - 1, 3] = 1e6
    mid_ok = torch.rand(K_MID_ROWS, 8, generator=gen, dtype=torch.float64)
    mid_range = mid_ok.clone()
    mid_range[K_MID_ROWS - 1, 5] = -3.0
    objects: list[tuple[str, Any]] = []
    ciphers = {bits: _cipher(bits) for bits in (1024, 2048, 128, 2025)}
    for bits in (1024, 2048, 128, 2025):
        objects.append((f"pk_{bits}", ciphers[bits].to_public()))
    ou = _ou_cipher(1024)
    objects.append(("pk_ou_1024", ou.to_public()))
    objects.append(
        ("enc_ou_1024", ou.get_tensor_encryptor().encrypt_tensor(torch.arange(12, dtype=torch.int64).reshape(4, 3)))
    )
    for bits in (1024, 2048):
        objects.append((f"enc_{bits}", ciphers[bits].get_tensor_encryptor().encrypt_tensor(ok[:4, :3].clone())))
    objects += [
        ("plain_ok", ok),
        ("plain_range", rng),
        ("plain_nan", nan),
        ("plain_empty", torch.zeros(16, 0, dtype=torch.float64)),
        ("plain_norows", torch.zeros(0, 4, dtype=torch.float64)),
        ("numpy_ok", np.asarray(ok.numpy(), dtype=np.float32)),
        ("mid_ok", {"weights": mid_ok, "note": "mid"}),
        ("mid_range", {"weights": mid_range, "note": "mid"}),
        ("big_ok", {"weights": big_ok, "note": "big"}),
        ("big_range", {"weights": big_range, "note": "big"}),
    ]
    return objects


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "--serve":
        _serve(pathlib.Path(argv[2]), pathlib.Path(argv[3]))
        return 0
    outdir = pathlib.Path(argv[1])
    outdir.mkdir(parents=True, exist_ok=True)
    from fate.arch.computing.backends.standalone import CSession  # type: ignore[import-not-found, unused-ignore]
    from fate.arch.context import Context  # type: ignore[import-not-found, unused-ignore]
    from fate.arch.federation.backends.osx import OSXFederation  # type: ignore[import-not-found, unused-ignore]

    port_file = outdir / "port"
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(outdir), str(port_file)], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("recording server did not start")
            time.sleep(0.05)
        port = int(port_file.read_text())
        owner: list[str] = []
        with tempfile.TemporaryDirectory() as data_dir:
            computing = CSession(session_id=f"{K_SESSION}-c", data_dir=data_dir)
            federation = OSXFederation.from_conf(
                federation_session_id=K_SESSION,
                computing_session=computing,
                party=K_GUEST,
                parties=[K_GUEST, K_HOST],
                host="127.0.0.1",
                port=port,
                max_message_size=1 << 20,
            )
            ctx = Context(computing=computing, federation=federation)
            for name, obj in _objects():
                ctx.hosts.put(name, obj)
                owner += [name] * (len(list(outdir.glob("*.bin"))) - len(owner))
            computing.stop()
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
    entries = []
    for i, name in enumerate(owner):
        meta = json.loads((outdir / f"{i:03d}.json").read_text())
        entries.append({**meta, "object": name})
    (outdir / "manifest.json").write_text(json.dumps(entries, indent=1))
    print("RESULT " + json.dumps({"ok": True, "messages": len(entries)}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "true")
    os.environ.setdefault("GRPC_POLL_STRATEGY", "poll")
    sys.exit(main(sys.argv))
