"""The ledger: hash chain, SQLite store, asyncio writer, signed checkpoints, verify/export/reconcile."""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedgate.audit import AuditConfig, HashChain, LedgerStore, LedgerWriter, verify_chain
from fedgate.audit.cli import main, reconcile
from fedgate.audit.keys import load_public_key, load_signing_key
from fedgate.audit.ledger_core import Checkpoint, LedgerEntry, record_for, sign_checkpoint
from fedgate.audit.ledger_store import K_ROWS_PER_INSERT
from fedgate.audit.ledger_writer import K_HASH_IN_WRITER
from fedgate.errors import ConfigError, LocalError, StoreFullError
from fedgate.proxy.envelope import Envelope


def envelope(i: int, *, session: str = "s1", src: str = "9999", dst: str = "10000") -> Envelope:
    return Envelope(
        message_id=f"m{i}",
        session_id=session,
        topic=f"{session}-t{i}",
        src_party=src,
        dst_party=dst,
        payload=f"payload {i}".encode(),
    )


def fill(path: pathlib.Path, key: Ed25519PrivateKey, n: int, *, every: int = 4, direction: str = "out") -> None:
    """Write n entries with a checkpoint every ``every`` entries, through the pure core and the store."""
    store = LedgerStore(path)
    seq, head = store.head()
    chain = HashChain(seq=seq, head=head)
    for i in range(seq + 1, seq + n + 1):
        entry = chain.append(record_for(envelope(i), direction, "accept", "", now=1000.0 + i))
        cp = sign_checkpoint(key, chain.seq, chain.head, now=1000.0 + i) if i % every == 0 else None
        store.append([entry], cp)
    store.close()


def verify(path: pathlib.Path, key: Ed25519PrivateKey) -> tuple[bool, int | None, str]:
    store = LedgerStore(path, readonly=True)
    try:
        report = verify_chain(store.entries(), store.checkpoints(), key.public_key())
    finally:
        store.close()
    return report.ok, report.first_bad_seq, report.reason


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def ledger(tmp_path: pathlib.Path, key: Ed25519PrivateKey) -> pathlib.Path:
    path = tmp_path / "ledger.db"
    fill(path, key, 12)
    return path


def sql(path: pathlib.Path, statement: str, *args: object) -> None:
    db = sqlite3.connect(path)
    db.execute(statement, args)
    db.commit()
    db.close()


def test_a_batch_larger_than_one_insert_is_written_whole_and_in_order(tmp_path: pathlib.Path) -> None:
    key = Ed25519PrivateKey.generate()
    n = 2 * K_ROWS_PER_INSERT + 5  # three INSERT statements, the last one short
    chain = HashChain(seq=0, head=LedgerStore(tmp_path / "l.db").head()[1])
    entries = [chain.append(record_for(envelope(i), "in", "accept", "", now=float(i))) for i in range(1, n + 1)]
    store = LedgerStore(tmp_path / "l.db")
    store.append(entries, sign_checkpoint(key, chain.seq, chain.head, now=0.0))
    store.close()
    store = LedgerStore(tmp_path / "l.db", readonly=True)
    assert list(store.entries()) == entries
    store.close()
    assert verify(tmp_path / "l.db", key) == (True, None, "ok")


def test_intact_ledger_verifies(ledger: pathlib.Path, key: Ed25519PrivateKey) -> None:
    assert verify(ledger, key) == (True, None, "ok")


def test_an_edit_is_found_at_its_entry(ledger: pathlib.Path, key: Ed25519PrivateKey) -> None:
    sql(ledger, "UPDATE entries SET verdict = 'reject' WHERE seq = 7")
    ok, bad, reason = verify(ledger, key)
    assert (ok, bad) == (False, 7) and "edited" in reason


def test_a_deletion_is_found(ledger: pathlib.Path, key: Ed25519PrivateKey) -> None:
    sql(ledger, "DELETE FROM entries WHERE seq = 5")
    ok, bad, reason = verify(ledger, key)
    assert (ok, bad) == (False, 5) and "missing" in reason


def test_a_reordering_is_found(ledger: pathlib.Path, key: Ed25519PrivateKey) -> None:
    # swap the contents of entries 3 and 4 (seq numbers stay where they were)
    sql(ledger, "UPDATE entries SET seq = -3 WHERE seq = 3")
    sql(ledger, "UPDATE entries SET seq = 3 WHERE seq = 4")
    sql(ledger, "UPDATE entries SET seq = 4 WHERE seq = -3")
    ok, bad, _ = verify(ledger, key)
    assert (ok, bad) == (False, 3)


def test_cutting_off_the_tail_is_found_by_the_checkpoint(ledger: pathlib.Path, key: Ed25519PrivateKey) -> None:
    sql(ledger, "DELETE FROM entries WHERE seq > 9")
    ok, bad, reason = verify(ledger, key)
    assert (ok, bad) == (False, 10) and "deleted" in reason


def test_a_rewritten_chain_fails_its_signed_checkpoints(tmp_path: pathlib.Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "l.db"
    fill(path, key, 8)
    # an attacker with the database (not the key) edits entry 2 and recomputes every hash after it
    store = LedgerStore(path)
    entries = list(store.entries())
    store.close()
    sql(path, "DELETE FROM entries")
    store = LedgerStore(path)
    chain = HashChain()
    forged = []
    for e in entries:
        record = replace(e.record, verdict="reject", rule="pickle.global") if e.seq == 2 else e.record
        forged.append(chain.append(record))
    store.append(forged)
    store.close()
    ok, bad, reason = verify(path, key)
    assert (ok, bad) == (False, 4) and "checkpoint" in reason


def test_a_forged_checkpoint_signature_is_found(ledger: pathlib.Path, key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    store = LedgerStore(ledger)
    head = next(store.entries(first=12))
    store.append([], sign_checkpoint(other, 12, head.hash, now=1.0))
    store.close()
    ok, bad, reason = verify(ledger, key)
    assert (ok, bad) == (False, 12) and "signature" in reason


def test_writer_batches_checkpoints_and_resumes(tmp_path: pathlib.Path) -> None:
    config = AuditConfig(
        ledger_path=tmp_path / "var" / "ledger.db",
        signing_key=tmp_path / "var" / "key.pem",
        checkpoint_every=10,
        ledger_batch=7,
    )

    async def session(first: int, n: int) -> int:
        writer = LedgerWriter.from_config(config)
        task = asyncio.create_task(writer.run())
        for i in range(first, first + n):
            writer.record(envelope(i), "out", "accept", "", now=float(i))
        await writer.flush()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await writer.aclose()
        return writer.written

    assert asyncio.run(session(1, 25)) == 25
    assert asyncio.run(session(26, 5)) == 5  # a restarted gateway continues the same chain
    assert (config.signing_key.stat().st_mode & 0o777) == 0o600
    key = load_signing_key(config.signing_key)
    ok, bad, _ = verify(config.ledger_path, key)
    assert ok and bad is None
    store = LedgerStore(config.ledger_path, readonly=True)
    cps = [cp.seq for cp in store.checkpoints()]
    assert [e.seq for e in store.entries()] == list(range(1, 31))
    store.close()
    # a checkpoint with the batch that reaches 10 unsigned entries, and one at each close
    assert 25 in cps and cps[-1] == 30
    assert all(b - a <= 10 + 7 - 1 for a, b in zip([0, *cps], cps, strict=False))


def test_large_payloads_are_hashed_on_the_writer_thread(tmp_path: pathlib.Path) -> None:
    big = [replace(envelope(i), payload=bytes([i]) * (K_HASH_IN_WRITER + i)) for i in range(1, 6)]

    async def scenario() -> None:
        writer = LedgerWriter(LedgerStore(tmp_path / "l.db"), Ed25519PrivateKey.generate(), batch=2)
        task = asyncio.create_task(writer.run())
        for i, env in enumerate(big):
            writer.record(env, "out", "accept", "", now=float(i))
            writer.record(envelope(100 + i), "in", "accept", "", now=float(i))
        await writer.flush()
        assert writer._unhashed == 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await writer.aclose()

    asyncio.run(scenario())
    store = LedgerStore(tmp_path / "l.db", readonly=True)
    entries = list(store.entries())
    store.close()
    assert [e.record.message_id for e in entries][::2] == [e.message_id for e in big]
    assert [e.record.sha256 for e in entries][::2] == [hashlib.sha256(e.payload).hexdigest() for e in big]
    assert all(len(e.record.sha256) == 64 for e in entries)


def test_a_failed_write_does_not_break_the_chain(tmp_path: pathlib.Path) -> None:
    class FlakyStore(LedgerStore):
        fail = True

        def append(self, entries: Sequence[LedgerEntry], checkpoint: Checkpoint | None = None) -> None:
            if self.fail and entries:
                self.fail = False
                raise sqlite3.OperationalError("disk I/O error")
            super().append(entries, checkpoint)

    key = Ed25519PrivateKey.generate()

    async def scenario() -> None:
        writer = LedgerWriter(FlakyStore(tmp_path / "l.db"), key, batch=100)
        writer.record(envelope(1), "out", "accept", "", now=1.0)
        with pytest.raises(sqlite3.OperationalError):
            await writer.run()  # the failure ends the writer task; the record of that batch is lost
        writer.record(envelope(2), "out", "accept", "", now=2.0)
        await writer.aclose()

    asyncio.run(scenario())
    assert verify(tmp_path / "l.db", key) == (True, None, "ok")
    store = LedgerStore(tmp_path / "l.db", readonly=True)
    assert [(e.seq, e.record.message_id) for e in store.entries()] == [(1, "m2")]
    store.close()


def test_records_gathered_for_a_commit_survive_a_cancel(tmp_path: pathlib.Path) -> None:
    key = Ed25519PrivateKey.generate()

    async def scenario() -> None:
        writer = LedgerWriter(LedgerStore(tmp_path / "l.db"), key, commit_interval_s=60.0)
        task = asyncio.create_task(writer.run())
        writer.record(envelope(1), "out", "accept", "", now=1.0)
        await asyncio.sleep(0.05)  # the writer has taken record 1 and waits for more
        writer.record(envelope(2), "out", "accept", "", now=2.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await writer.aclose()

    asyncio.run(scenario())
    store = LedgerStore(tmp_path / "l.db", readonly=True)
    assert [e.record.message_id for e in store.entries()] == ["m1", "m2"]
    store.close()
    assert verify(tmp_path / "l.db", key)[0]


def test_a_batch_handed_to_a_busy_writer_thread_survives_a_cancel(tmp_path: pathlib.Path) -> None:
    """Cancelling run() right after it handed a batch over, before the writer thread picked the job up (a
    busy thread, or one not scheduled yet on a loaded host), must not drop the batch (it once did: the
    gateway's stop lost the last records, found by a failed reconcile in CI)."""
    key = Ed25519PrivateKey.generate()

    async def scenario() -> None:
        writer = LedgerWriter(LedgerStore(tmp_path / "l.db"), key, commit_interval_s=0.0)
        task = asyncio.create_task(writer.run())
        while writer._chain is None:  # the head is loaded: run() waits for records
            await asyncio.sleep(0.01)
        gate = threading.Event()
        writer._executor.submit(gate.wait, 10.0)  # the writer thread is busy; the next job waits its turn
        writer.record(envelope(1), "out", "accept", "", now=1.0)
        for _ in range(100):  # run() takes the record and hands its batch to the (busy) thread
            if writer._queue.empty() and not writer._taken:
                break
            await asyncio.sleep(0)
        assert writer._queue.empty() and not writer._taken
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        writer.record(envelope(2), "out", "accept", "", now=2.0)
        gate.set()
        await writer.aclose()

    asyncio.run(scenario())
    store = LedgerStore(tmp_path / "l.db", readonly=True)
    assert [e.record.message_id for e in store.entries()] == ["m1", "m2"]
    store.close()
    assert verify(tmp_path / "l.db", key) == (True, None, "ok")


def test_writer_queue_full_is_store_full(tmp_path: pathlib.Path) -> None:
    async def scenario() -> None:
        writer = LedgerWriter(LedgerStore(tmp_path / "l.db"), Ed25519PrivateKey.generate(), queue_size=2)
        writer.record(envelope(1), "out", "accept", "", now=0.0)
        writer.record(envelope(2), "out", "accept", "", now=0.0)
        with pytest.raises(StoreFullError):
            writer.record(envelope(3), "out", "accept", "", now=0.0)
        await writer.aclose()

    asyncio.run(scenario())
    store = LedgerStore(tmp_path / "l.db", readonly=True)
    assert [e.record.message_id for e in store.entries()] == ["m1", "m2"]
    store.close()


def test_cli_verify_and_export(
    ledger: pathlib.Path, key: Ed25519PrivateKey, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = tmp_path / "pub.pem"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    assert main(["verify", "--ledger", str(ledger), "--key", str(pub)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    sql(ledger, "UPDATE entries SET size = 1 WHERE seq = 6")
    assert main(["verify", "--ledger", str(ledger), "--key", str(pub)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["first_bad_seq"] == 6
    out = tmp_path / "x.jsonl"
    assert main(["export", "--ledger", str(ledger), "--from", "3", "--to", "5", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq"] for r in rows] == [3, 4, 5]
    assert set(rows[0]) >= {"direction", "src_party", "dst_party", "session_id", "topic", "message_id", "sha256"}
    assert main(["verify", "--ledger", str(tmp_path / "nope.db"), "--key", str(pub)]) == 2
    assert main(["bogus"]) == 2


def test_reconcile_lists_what_the_peer_never_recorded(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ours, theirs = tmp_path / "a.db", tmp_path / "b.db"
    a, b = LedgerStore(ours), LedgerStore(theirs)
    ca, cb = HashChain(), HashChain()
    for i in range(1, 7):
        a.append([ca.append(record_for(envelope(i), "out", "accept", "", now=float(i)))])
        if i != 4:  # message 4 never arrived
            env = envelope(i) if i != 5 else replace(envelope(i), payload=b"altered")  # 5 arrived altered
            b.append([cb.append(record_for(env, "in", "accept", "", now=float(i)))])
    b.append([cb.append(record_for(envelope(50, src="10000", dst="9999"), "out", "accept", "", now=9.0))])
    a.close()
    b.close()
    assert main(["reconcile", "--ours", str(ours), "--theirs", str(theirs), "--session", "s1"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = {(r["kind"], r["sent_by"], r["message_id"]) for r in rows}
    assert got == {("missing", "ours", "m4"), ("altered", "ours", "m5"), ("missing", "theirs", "m50")}
    assert reconcile([], []) == []


def test_key_files(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError):
        load_signing_key(tmp_path / "missing.pem")
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(ConfigError):
        load_public_key(tmp_path / "bad.pem")
    key = load_signing_key(tmp_path / "k.pem", create=True)
    assert load_public_key(tmp_path / "k.pem").public_bytes_raw() == key.public_key().public_bytes_raw()


def test_entry_hash_is_the_canonical_json_of_the_record() -> None:
    """The fast encoding (fields read in sorted order) hashes the same bytes as the documented one."""
    import dataclasses
    import hashlib
    import json

    from fedgate.audit.ledger_core import K_VERSION, entry_hash

    record = record_for(envelope(7), "in", "shadow-reject", "pickle.global", now=1.5e9 + 0.125)
    record = dataclasses.replace(record, topic="t\u00e9\"\\\n", session_id="s\u2603")
    canonical = json.dumps([K_VERSION, 3, "ab" * 32, dataclasses.asdict(record)], sort_keys=True,
                           separators=(",", ":"), ensure_ascii=True).encode()
    assert entry_hash(3, "ab" * 32, record) == hashlib.sha256(canonical).hexdigest()


def test_synced_returns_once_the_records_are_committed_without_waiting_for_the_gathering(
    tmp_path: pathlib.Path,
) -> None:
    """Group commit: a caller of synced() cuts the commit interval short; what it waited for is on disk."""
    key = Ed25519PrivateKey.generate()

    def on_disk() -> list[str]:
        store = LedgerStore(tmp_path / "l.db", readonly=True)
        try:
            return [e.record.message_id for e in store.entries()]
        finally:
            store.close()

    async def scenario() -> None:
        writer = LedgerWriter(LedgerStore(tmp_path / "l.db"), key, commit_interval_s=60.0)
        task = asyncio.create_task(writer.run())
        await writer.synced()  # nothing queued: returns at once
        for i in (1, 2, 3):
            writer.record(envelope(i), "out", "accept", "", now=float(i))
        await asyncio.wait_for(writer.synced(), timeout=10)  # not the 60 s gathering
        assert on_disk() == ["m1", "m2", "m3"]
        writer.record(envelope(4), "in", "accept", "", now=4.0)
        waiters = [asyncio.ensure_future(writer.synced()) for _ in range(3)]
        writer.record(envelope(5), "in", "accept", "", now=5.0)
        await asyncio.wait_for(writer.synced(), timeout=10)
        assert all(w.done() for w in waiters)
        assert on_disk() == ["m1", "m2", "m3", "m4", "m5"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await writer.aclose()

    asyncio.run(scenario())
    assert verify(tmp_path / "l.db", key) == (True, None, "ok")


def test_synced_fails_when_the_write_fails(tmp_path: pathlib.Path) -> None:
    class BrokenStore(LedgerStore):
        def append(self, entries: Sequence[LedgerEntry], checkpoint: Checkpoint | None = None) -> None:
            if entries:
                raise sqlite3.OperationalError("disk I/O error")
            super().append(entries, checkpoint)

    async def scenario() -> None:
        writer = LedgerWriter(BrokenStore(tmp_path / "l.db"), Ed25519PrivateKey.generate())
        task = asyncio.create_task(writer.run())
        writer.record(envelope(1), "out", "accept", "", now=1.0)
        with pytest.raises(LocalError):
            await asyncio.wait_for(writer.synced(), timeout=10)  # the message is never acknowledged
        with pytest.raises(sqlite3.OperationalError):
            await task
        with pytest.raises(LocalError):
            await writer.synced()

    asyncio.run(scenario())
