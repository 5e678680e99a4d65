"""``fedgate audit``: verify, export and reconcile ledgers; check a policy file.

    fedgate audit verify    --ledger var/ledger.db --key var/ledger-signing.key
    fedgate audit export    --ledger var/ledger.db [--from N] [--to M] [--session S] [--out FILE]
    fedgate audit reconcile --ours A.db --theirs B.db --session S
    fedgate audit policy    conf/audit_policy.toml

Exit status: 0 all well; 1 the ledger is tampered with / the ledgers disagree; 2 bad usage or a file
that cannot be read. Output is one JSON object per line (verify prints one summary line).

Rules of this module: argument parsing and printing only; the work is in ``ledger_core`` and
``ledger_store``; errors become a message on stderr and an exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import TextIO

from fedgate.audit.keys import load_public_key
from fedgate.audit.ledger_core import LedgerEntry, verify_chain
from fedgate.audit.ledger_store import LedgerStore
from fedgate.audit.policy import load_policy
from fedgate.errors import ConfigError

__all__ = ["main", "reconcile"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedgate audit", description="Audit ledger tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check the hash chain and the signed checkpoints")
    p.add_argument("--ledger", default="var/ledger.db")
    p.add_argument("--key", default="var/ledger-signing.key", help="signing key (private or public PEM)")
    p = sub.add_parser("export", help="write entries as JSON lines")
    p.add_argument("--ledger", default="var/ledger.db")
    p.add_argument("--from", dest="first", type=int, default=1, help="first seq (inclusive)")
    p.add_argument("--to", dest="last", type=int, default=None, help="last seq (inclusive)")
    p.add_argument("--session", default=None, help="only this session id")
    p.add_argument("--out", default="-", help="output file; - for stdout")
    p = sub.add_parser("reconcile", help="messages one party sent that the other never recorded")
    p.add_argument("--ours", required=True, help="this party's ledger")
    p.add_argument("--theirs", required=True, help="the other party's ledger")
    p.add_argument("--session", required=True)
    p = sub.add_parser("policy", help="validate an audit policy file")
    p.add_argument("file")
    return parser


def main(argv: Sequence[str]) -> int:
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse exits on --help and on bad usage
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    try:
        if args.command == "verify":
            return _verify(args.ledger, args.key, sys.stdout)
        if args.command == "export":
            return _export(args, sys.stdout)
        if args.command == "reconcile":
            return _reconcile(args.ours, args.theirs, args.session, sys.stdout)
        load_policy(args.file)
        print(json.dumps({"ok": True, "file": args.file}))
        return 0
    except ConfigError as exc:
        print(f"fedgate audit: {exc}", file=sys.stderr)
        return 2


def _verify(ledger: str, key_path: str, out: TextIO) -> int:
    key = load_public_key(key_path)
    store = LedgerStore(ledger, readonly=True)
    try:
        report = verify_chain(store.entries(), store.checkpoints(), key)
    finally:
        store.close()
    out.write(json.dumps(asdict(report)) + "\n")
    return 0 if report.ok else 1


def _entry_json(entry: LedgerEntry) -> str:
    return json.dumps({"seq": entry.seq, **asdict(entry.record), "prev_hash": entry.prev_hash, "hash": entry.hash})


def _export(args: argparse.Namespace, stdout: TextIO) -> int:
    store = LedgerStore(args.ledger, readonly=True)
    try:
        out = stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")  # noqa: SIM115
        try:
            for entry in store.entries(first=args.first, last=args.last, session_id=args.session):
                out.write(_entry_json(entry) + "\n")
        finally:
            if out is not stdout:
                out.close()
    finally:
        store.close()
    return 0


def reconcile(ours: Sequence[LedgerEntry], theirs: Sequence[LedgerEntry]) -> list[dict[str, object]]:
    """Differences between two parties' entries for one session (pure).

    ``missing``: a message one side sent (accepted outbound) that the other never recorded inbound,
    limited to messages addressed to the other side's parties (those seen in its own entries);
    ``altered``: recorded on both sides with different payload hashes.
    """
    findings: list[dict[str, object]] = []
    for sender, receiver, label in ((ours, theirs, "ours"), (theirs, ours, "theirs")):
        receiver_parties = {e.record.dst_party for e in receiver if e.record.direction == "in"} | {
            e.record.src_party for e in receiver if e.record.direction == "out"
        }
        received = {e.record.message_id: e for e in receiver if e.record.direction == "in"}
        for e in sender:
            r = e.record
            if r.direction != "out" or r.verdict == "reject":
                continue
            if receiver_parties and r.dst_party not in receiver_parties:
                continue
            got = received.get(r.message_id)
            if got is None:
                kind = "missing"
            elif got.record.sha256 != r.sha256:
                kind = "altered"
            else:
                continue
            findings.append(
                {
                    "kind": kind,
                    "sent_by": label,
                    "seq": e.seq,
                    "message_id": r.message_id,
                    "topic": r.topic,
                    "src_party": r.src_party,
                    "dst_party": r.dst_party,
                    "size": r.size,
                    "sha256": r.sha256,
                    "ts": r.ts,
                }
            )
    return findings


def _reconcile(ours_path: str, theirs_path: str, session: str, out: TextIO) -> int:
    loaded = []
    for path in (ours_path, theirs_path):
        store = LedgerStore(path, readonly=True)
        try:
            loaded.append(list(store.entries(session_id=session)))
        finally:
            store.close()
    findings = reconcile(loaded[0], loaded[1])
    for finding in findings:
        out.write(json.dumps(finding) + "\n")
    return 1 if findings else 0
