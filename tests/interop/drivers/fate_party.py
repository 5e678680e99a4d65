"""A real FATE 2.x party (guest, host or arbiter) talking OSX queue mode to its proxy.

Runs INSIDE the pyfate test virtualenv (``.test-venvs/pyfate``), as its own process; it must never
import fedgate. Rules of this file:

- Every payload is a pure function of (scenario, iteration, name), so a receiver rebuilds what the
  sender must have sent and checks equality; nothing is shared between processes but the wire.
- The process prints exactly one JSON result line, prefixed ``RESULT ``, last on stdout:
  ``{"role", "party_id", "ok", "checks", "failures", "phase", "elapsed_s", ...}``; exit status 0
  only when ``ok``. Logs go to stderr.
- Scenarios:
  ``triad``: guest, host and arbiter. The arbiter makes a Paillier key and sends the public
  cipher to guest and host; each iteration the guest sends its encrypted tensor and a plain tensor
  to the host, the host adds its own plain tensor homomorphically and sends the encrypted sum to
  the arbiter, the arbiter decrypts, checks and returns the plain sum to both, and the host sends
  the guest an object over 1 MiB (FATE's split/table path). A final all-to-all ``done`` barrier
  keeps any party from releasing the session before the others have read everything.
  ``oneway``: guest -> host only, in two phases (``--phase send`` then ``--phase recv``, separate
  processes), so that a test can restart proxies in between: the guest sends a full Paillier cipher
  (keys) once, then per iteration an encrypted tensor, a plain tensor and an object over 1 MiB.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

K_BIG_OBJECT_BYTES = 1_572_864  # bytes: 1.5 MiB, above FATE's 1 MiB split threshold
K_TENSOR_SHAPE = (16, 4)  # elements
K_KEY_BITS = 1024  # bits: FATE's minimum Paillier key size
K_TOLERANCE = 1e-6  # absolute, for decrypted fixed-point floats
K_WARM_PARTITIONS = 4  # partitions of the warm-up table that forks the standalone process pool


def _mod(name: str) -> Any:
    """Import a module of the client venv (typed Any: mypy runs where pyfate is not installed)."""
    return importlib.import_module(name)


def _inc(x: int) -> int:
    return x + 1


def _tensor(scenario: str, i: int, name: str) -> Any:
    torch = _mod("torch")
    gen = torch.Generator().manual_seed(_seed(scenario, i, name))
    return torch.rand(*K_TENSOR_SHAPE, generator=gen, dtype=torch.float64)


def _big(scenario: str, i: int) -> dict[str, Any]:
    np = _mod("numpy")
    rnd = random.Random(_seed(scenario, i, "big"))
    blob = rnd.randbytes(K_BIG_OBJECT_BYTES)
    arr = np.array([rnd.random() for _ in range(4096)], dtype=np.float64)
    return {"iteration": i, "blob": blob, "array": arr, "note": f"big-{scenario}-{i}"}


def _seed(scenario: str, i: int, name: str) -> int:
    # A stable seed (no hash randomisation): sum of bytes weighted by position.
    text = f"{scenario}/{i}/{name}"
    return sum((k + 1) * b for k, b in enumerate(text.encode())) * 1000003 + i


class _Checker:
    def __init__(self) -> None:
        self.checks = 0
        self.failures: list[str] = []

    def equal_tensor(self, what: str, got: Any, want: Any, *, tol: float = 0.0) -> None:
        torch = _mod("torch")
        self.checks += 1
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            self.failures.append(f"{what}: got {type(got).__name__} {getattr(got, 'shape', None)}")
        elif tol == 0.0 and not torch.equal(got, want):
            self.failures.append(f"{what}: tensor differs")
        elif tol > 0.0 and not torch.allclose(got, want, atol=tol, rtol=0.0):
            self.failures.append(f"{what}: tensor differs beyond {tol}")

    def equal_big(self, what: str, got: Any, want: dict[str, Any]) -> None:
        np = _mod("numpy")
        self.checks += 1
        if not isinstance(got, dict):
            self.failures.append(f"{what}: got {type(got).__name__}, want dict")
            return
        bad = [k for k in ("iteration", "note", "blob") if got.get(k) != want[k]]
        arr = got.get("array")
        if not isinstance(arr, np.ndarray) or not np.array_equal(arr, want["array"]):
            bad.append("array")
        if bad:
            sizes = {k: len(v) for k, v in got.items() if isinstance(v, bytes | np.ndarray)}
            self.failures.append(f"{what}: fields {bad} differ (received sizes {sizes})")

    def equal(self, what: str, got: object, want: object) -> None:
        self.checks += 1
        if got != want:
            self.failures.append(f"{what}: got {got!r}, want {want!r}")


def _parse_parties(text: str) -> list[tuple[str, str]]:
    out = []
    for item in text.split(","):
        role, _, party_id = item.partition(":")
        out.append((role.strip(), party_id.strip()))
    return out


def _build_context(args: argparse.Namespace) -> Any:
    CSession = _mod("fate.arch.computing.backends.standalone").CSession
    Context = _mod("fate.arch.context").Context
    OSXFederation = _mod("fate.arch.federation.backends.osx").OSXFederation

    parties = _parse_parties(args.parties)
    party = (args.role, args.party_id)
    if party not in parties:
        raise SystemExit(f"--role/--party-id {party} not in --parties {parties}")
    computing = CSession(session_id=f"{args.session}-{args.role}-c", data_dir=args.data_dir)
    # Fork the standalone process pool before the first gRPC call. pyfate never closes its channels;
    # when the pool forks later, gRPC's fork handler sometimes fails ("Failed to shutdown gRPC Core
    # after fork()") and a worker dies (BrokenProcessPool): a client-side flake, not the proxy's.
    # A ProcessPoolExecutor with the fork start method forks all its workers at the first submit.
    warm = computing.parallelize(range(K_WARM_PARTITIONS), include_key=False, partition=K_WARM_PARTITIONS)
    if sorted(warm.mapValues(_inc).collect()) != [(k, k + 1) for k in range(K_WARM_PARTITIONS)]:
        raise RuntimeError("standalone computing warm-up returned a wrong table")
    federation = OSXFederation.from_conf(
        federation_session_id=args.session,
        computing_session=computing,
        party=party,
        parties=parties,
        host=args.host,
        port=args.port,
        max_message_size=args.max_message_size,
    )
    return Context(computing=computing, federation=federation)


def _triad(ctx: Any, args: argparse.Namespace, chk: _Checker) -> None:
    n = args.iterations
    role = args.role
    cipher: Any = None
    if role == "arbiter":
        cipher = ctx.cipher.phe.setup({"kind": "paillier", "key_length": K_KEY_BITS})
        ctx.guest.put("phe_public", cipher.to_public())
        ctx.hosts.put("phe_public", cipher.to_public())
    else:
        cipher = ctx.arbiter.get("phe_public")
        chk.equal("phe_public.key_size", getattr(cipher, "key_size", None), K_KEY_BITS)

    for i, sub in ctx.on_iterations.ctxs_range(n):
        x_g = _tensor("triad", i, "guest")
        x_h = _tensor("triad", i, "host")
        if role == "guest":
            enc = cipher.get_tensor_encryptor().encrypt_tensor(x_g)
            sub.hosts.put("enc_guest", enc)
            sub.hosts.put("plain_guest", x_g)
            chk.equal_tensor(f"it{i}.sum@guest", sub.arbiter.get("plain_sum"), x_g + x_h, tol=K_TOLERANCE)
            chk.equal_big(f"it{i}.big@guest", sub.hosts[0].get("big"), _big("triad", i))
        elif role == "host":
            enc = sub.guest.get("enc_guest")
            chk.equal_tensor(f"it{i}.plain_guest@host", sub.guest.get("plain_guest"), x_g)
            sub.arbiter.put("enc_sum", enc + x_h)
            sub.guest.put("big", _big("triad", i))
            chk.equal_tensor(f"it{i}.sum@host", sub.arbiter.get("plain_sum"), x_g + x_h, tol=K_TOLERANCE)
        else:
            enc_sum = sub.hosts[0].get("enc_sum")
            plain = cipher.get_tensor_decryptor().decrypt_tensor(enc_sum)
            chk.equal_tensor(f"it{i}.sum@arbiter", plain, x_g + x_h, tol=K_TOLERANCE)
            sub.guest.put("plain_sum", plain)
            sub.hosts.put("plain_sum", plain)

    # Barrier: nobody releases the session before everyone has read everything.
    others = [p for p in ctx.parties if p.party != (role, args.party_id)]
    for p in others:
        p.put("done", role)
    for p in others:
        chk.equal(f"done from {p.party}", p.get("done"), p.party[0])


def _oneway(ctx: Any, args: argparse.Namespace, chk: _Checker) -> None:
    n = args.iterations
    if args.role == "guest" and args.phase in ("send", "both"):
        cipher = ctx.cipher.phe.setup({"kind": "paillier", "key_length": K_KEY_BITS})
        ctx.hosts.put("phe_cipher", cipher)
        for i, sub in ctx.on_iterations.ctxs_range(n):
            x = _tensor("oneway", i, "guest")
            sub.hosts.put("enc", cipher.get_tensor_encryptor().encrypt_tensor(x))
            sub.hosts.put("plain", x)
            sub.hosts.put("big", _big("oneway", i))
    elif args.role == "host" and args.phase in ("recv", "both"):
        cipher = ctx.guest.get("phe_cipher")
        for i, sub in ctx.on_iterations.ctxs_range(n):
            x = _tensor("oneway", i, "guest")
            enc = sub.guest.get("enc")
            dec = cipher.get_tensor_decryptor().decrypt_tensor(enc)
            chk.equal_tensor(f"it{i}.enc@host", dec, x, tol=K_TOLERANCE)
            chk.equal_tensor(f"it{i}.plain@host", sub.guest.get("plain"), x)
            chk.equal_big(f"it{i}.big@host", sub.guest.get("big"), _big("oneway", i))
    else:
        raise SystemExit(f"oneway: nothing to do for role {args.role} in phase {args.phase}")


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="fate_party", description=__doc__.split("\n\n")[0])
    p.add_argument("--role", required=True, choices=["guest", "host", "arbiter"])
    p.add_argument("--party-id", required=True)
    p.add_argument("--parties", required=True, help="role:id,role:id,... e.g. guest:9999,host:10000")
    p.add_argument("--host", default="127.0.0.1", help="this party's proxy (OSX front) address")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--session", required=True, help="federation session id (x-ptp-session-id)")
    p.add_argument("--data-dir", required=True, help="standalone computing data directory")
    p.add_argument("--scenario", choices=["triad", "oneway"], default="triad")
    p.add_argument("--phase", choices=["send", "recv", "both"], default="both")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--max-message-size", type=int, default=None, help="bytes; FATE's default is 1 MiB")
    p.add_argument("--no-destroy", action="store_true", help="skip ctx.destroy() (the session release)")
    args = p.parse_args(argv)

    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("FATE_DRIVER_LOG", "WARNING"),
        format=f"%(asctime)s {args.role} %(name)s %(levelname)s %(message)s",
    )
    start = time.monotonic()
    chk = _Checker()
    error = ""
    try:
        ctx = _build_context(args)
        if args.scenario == "triad":
            _triad(ctx, args, chk)
        else:
            _oneway(ctx, args, chk)
        if not args.no_destroy:
            ctx.destroy()
    except Exception as exc:  # report, don't hide: the test prints it
        logging.getLogger("fate_party").exception("driver failed")
        error = f"{type(exc).__name__}: {exc}"
    ok = not error and not chk.failures and (chk.checks > 0 or args.phase == "send")
    result = {
        "driver": "fate_party",
        "role": args.role,
        "party_id": args.party_id,
        "scenario": args.scenario,
        "phase": args.phase,
        "iterations": args.iterations,
        "ok": bool(ok),
        "checks": chk.checks,
        "failures": chk.failures[:20],
        "error": error,
        "elapsed_s": round(time.monotonic() - start, 3),
    }
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
