"""Measure the audit chain + ledger overhead on ``fedgate bench proxy`` (a measurement script, not a test).

``fedgate bench proxy`` writes its own gateway configs and pushes OSX Messages whose body is a FATE
inline object (a pickle of random bytes) but whose head is a raw timestamp, not FATE's JSON head, so
the default policy rejects them (``malformed.osx``). This script runs the unchanged bench with its
config writer wrapped to replace the ``[audit]`` section, in three modes:

* ``off``: ``[audit] enabled = false`` (no chain, no ledger);
* ``chain``: the chain on, the ledger off;
* ``on``: the chain and the ledger on.

Both audited modes use a policy that tolerates the non-JSON head (``require_fate_framing = false``):
every message is parsed, its body pickle walked (one large bytes argument: no tensor statistics),
judged by all filters (and, in ``on``, hashed and appended to the ledger) at every gateway it
crosses. Tensor statistics cost more: ``python -m fedgate.audit.bench`` measures them per message.

The figure is the gateways' CPU time per message (both gateway processes, from RUSAGE_CHILDREN once
they have exited), with a run of one message per case subtracted for start-up: CPU time, unlike
msg/s, stays meaningful on a machine shared with other jobs. msg/s is printed too, for reference.

Usage: .venv/bin/python tests/audit/proxy_overhead.py [--rounds N] [--count-1k N] [--count-1m N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import re
import resource
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import fedgate.bench.proxy as bench_proxy

K_MODES = {
    "off": "[audit]\nenabled = false\n",
    "chain": '[audit]\npolicy_file = "{policy}"\nledger = false\n',
    "on": '[audit]\npolicy_file = "{policy}"\n',
}


@contextlib.contextmanager
def _audit(section: str) -> Iterator[None]:
    """Wrap the bench's config writer: drop any ``[audit]`` table it wrote and append ``section``."""
    original: Callable[..., Any] = bench_proxy._write_gateway

    def write(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        policy = config.parent / "audit_policy.toml"
        policy.write_text("[default]\nrequire_fate_framing = false\n")
        text = re.sub(r"(?ms)^\[audit\]\n.*?(?=^\[|\Z)", "", config.read_text())
        config.write_text(text + section.format(policy=policy))
        return result

    bench_proxy._write_gateway = write
    try:
        yield
    finally:
        bench_proxy._write_gateway = original


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(mode: str, count_1k: int, count_1m: int) -> tuple[float, list[dict[str, Any]]]:
    """Gateway CPU seconds of one bench run, and its result rows."""
    with tempfile.TemporaryDirectory() as tmp, _audit(K_MODES[mode]):
        out = pathlib.Path(tmp) / "r.json"
        before = _children_cpu()
        with contextlib.redirect_stdout(io.StringIO()):
            bench_proxy.main(
                ["--count-1k", str(count_1k), "--count-1m", str(count_1m), "--concurrency", "8", "--json", str(out)]
            )
        cpu = _children_cpu() - before
        rows: list[dict[str, Any]] = json.loads(out.read_text())
        return cpu, rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="proxy_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--count-1k", type=int, default=1000)
    parser.add_argument("--count-1m", type=int, default=100)
    args = parser.parse_args(argv)
    cpu: dict[tuple[str, str], float] = {}
    rate: dict[tuple[str, str, int], float] = {}
    for _ in range(args.rounds):
        for mode in K_MODES:
            idle, _ = _run(mode, 1, 1)
            for case, counts in (("1KiB", (args.count_1k, 1)), ("1MiB", (1, args.count_1m))):
                spent, rows = _run(mode, *counts)
                size = 1024 if case == "1KiB" else 1024 * 1024
                messages = sum(r["messages"] for r in rows if r["size"] == size)
                paths = sum(1 for r in rows if r["size"] == size)
                per_msg = max(0.0, spent - idle) / max(1, messages - paths)
                cpu[(mode, case)] = min(cpu.get((mode, case), float("inf")), per_msg)
                for row in rows:
                    if row["messages"] > 1:
                        key = (mode, row["path"], row["size"])
                        rate[key] = max(rate.get(key, 0.0), row["msg_per_s"])
            print(f"round done: {mode}", flush=True)
    print("\ngateway CPU per message (all gateways, best of rounds, start-up subtracted)")
    print("case    off us   chain us   on us   chain/off   on/off")
    for case in ("1KiB", "1MiB"):
        off, chain, on = (cpu[(m, case)] * 1e6 for m in K_MODES)
        print(f"{case:<6} {off:8.0f} {chain:9.0f} {on:8.0f}   {chain / off:8.3f} {on / off:8.3f}")
    print("\nmsg/s (wall clock; noisy on a shared machine)")
    for (mode, path, size), value in sorted(rate.items()):
        print(f"{mode:<6} {path:<13} {size:>8} {value:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
